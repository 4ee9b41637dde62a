"""A shard whose n-gram pairs the device path left incomplete (more fires in a batch than it kept) gets them again
from a second pass (engine.record.executor.Recorder._exact_pairs): the cache is the one recorded without overflow.
Both run the torch formulation (the GPU's) on the CPU."""
from __future__ import annotations

import numpy as np

from ffnscope.engine.record import executor, stats as stats_module
from tests.helpers import assert_same_cache, record_tiny
from tests.tiny_models import tiny_model_dir


def test_overflowed_pairs_are_recorded_again_exactly(text_file, tmp_path, monkeypatch):
    model = tiny_model_dir(tmp_path / "model", "llama", n_layers=2)
    monkeypatch.setattr(stats_module, "cpu_kernels", None)
    reference = record_tiny(tmp_path / "whole.h5", model, [text_file], tau=0.0)
    assert any(len(p) for layer in reference.layers.values() if layer.ngram_counted is not None
               for p in layer.ngrams.values()), "the tiny recording must have n-gram pairs to lose"

    repairs = []
    real_repair = executor.Recorder._exact_pairs

    def repair(self, state, block, seq_index, layers):
        repairs.append(list(layers))
        return real_repair(self, state, block, seq_index, layers)
    # keeping a single fire per batch: every batch overflows
    monkeypatch.setattr(stats_module, "default_pair_capacity", lambda tokens, counted: 1)
    monkeypatch.setattr(executor.Recorder, "_exact_pairs", repair)
    record_tiny(tmp_path / "device.h5", model, [text_file], tau=0.0)
    n_shards = reference.meta["recording"]["n_shards"]
    assert len(repairs) == n_shards and all(layers == [0] for layers in repairs)  # the n-gram layer, each shard
    assert_same_cache(tmp_path / "whole.h5", tmp_path / "device.h5")


def test_without_overflow_no_second_pass(text_file, tmp_path, monkeypatch):
    model = tiny_model_dir(tmp_path / "model", "llama", n_layers=2)
    monkeypatch.setattr(stats_module, "cpu_kernels", None)
    calls = []
    monkeypatch.setattr(executor.Recorder, "_exact_pairs", lambda *a: calls.append(a) or {})
    state = record_tiny(tmp_path / "device.h5", model, [text_file], tau=0.0)
    assert not calls and np.any([len(p) for layer in state.layers.values() if layer.ngram_counted is not None
                                 for p in layer.ngrams.values()])
