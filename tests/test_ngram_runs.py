"""n-gram pairs as sorted runs per shard, merged once; checkpoints on a cadence (issue 11, cache.runs)."""
from __future__ import annotations

from contextlib import ExitStack

import h5py
import numpy as np
import pytest

from ffnscope.cache import runs as runs_module
from ffnscope.cache import schema, store
from ffnscope.cache.reader import CacheReader
from ffnscope.cache.state import (G_ORDERS, NGRAM_ORDERS, DataState, GramCounts, LayerState, RecordingState, Samples,
                                  Sparse)
from ffnscope.cache.store import read_state, segments_dir, write_segment, write_state
from ffnscope.engine.record import executor
from ffnscope.engine.record.config import RecordConfig
from ffnscope.engine.record.job import record
from tests.helpers import FAST, assert_same_cache

D_FFN, SEQ_LEN = 12, 4


def _shard_pairs(rng, counted: np.ndarray, n: int) -> Sparse:
    """A shard's reduced pairs over the counted neurons, g sums of wildly mixed magnitudes (so any
    other order of addition rounds differently)."""
    gram = rng.integers(0, 40, 300)
    neuron = rng.choice(np.flatnonzero(counted), 300).astype(np.int32)
    g = rng.standard_normal(300) * 10.0 ** rng.integers(-8, 9, 300)
    part = Sparse(gram, neuron, rng.integers(1, 5, 300), g if n in G_ORDERS else None)
    return Sparse.reduce([part], n in G_ORDERS)


def _empty_state(layer: LayerState) -> RecordingState:
    data = DataState(np.zeros((0, SEQ_LEN), np.int32), np.zeros(0, np.int64), np.zeros((0, SEQ_LEN), np.uint8),
                     np.zeros(50, np.int64), {n: GramCounts(np.zeros(0, np.int64), np.zeros(0, np.int64))
                                              for n in (2, 3)})
    meta = {"model": {"spec": "m", "name": "m", "family": "OPT", "fingerprint": "f", "activation": "relu", "dtype":
                      "float32", "n_layers": 1, "d_model": 8, "d_ffn": D_FFN, "vocab_size": 50},
            "tokenizer": {}, "data": {"sources": [], "fingerprint": "d", "seq_len": SEQ_LEN},
            "recording": {"taus": [0.0], "primary_tau": 0.0, "primary_index": 0, "layers": [0], "ngram_layers": [0],
                          "n_shards": 6}}  # the least a reader accepts (cache.validate)
    return RecordingState(meta, {0: layer}, data, Samples(np.zeros(0, np.int64), np.zeros((1, 0, D_FFN), np.float16)),
                          vocab=[""] * 50, pieces=[""] * 50)


def test_runs_merged_in_chunks_equal_the_fold_in_memory_bit_for_bit(tmp_path, monkeypatch):
    """Shards' pairs with neurons dropped in between: the checkpoint's runs summed on read and the final
    streamed merge (in many small chunks) both equal adding the shards up in memory (LayerState.add and
    drop_ngrams_over, what the recorder did before runs), g sums to the bit."""
    rng = np.random.default_rng(0)
    fold = LayerState.zeros(1, D_FFN, SEQ_LEN, 2, np.ones(D_FFN, bool))
    segments, empty = [], _empty_state(LayerState.zeros(1, D_FFN, SEQ_LEN, 2))
    limit = 60
    for shard in range(6):
        shard_layer = LayerState.zeros(1, D_FFN, SEQ_LEN, 2, fold.ngram_counted.copy())
        shard_layer.fire_count[0] = rng.poisson(np.linspace(2, 25, D_FFN))  # the busiest pass the limit early
        shard_layer.ngrams = {n: _shard_pairs(rng, fold.ngram_counted, n) for n in NGRAM_ORDERS}
        fold.add(shard_layer)
        fold.drop_ngrams_over(limit, 0)
        run = {n: p.drop_neurons(fold.ngram_counted) for n, p in shard_layer.ngrams.items()}  # as layer_done
        segments.append(write_segment(tmp_path / "c.h5", f"{shard:06d}", empty.data, empty.samples, {0: run}))
    assert 0 < fold.ngram_counted.sum() < D_FFN - 2  # drops happened, in more than one shard
    final = LayerState.zeros(1, D_FFN, SEQ_LEN, 2, fold.ngram_counted)
    final.ngrams = {}

    out = tmp_path / "c.h5"
    write_state(out, _empty_state(final), schema.PARTIAL, compress=False, segments=segments)
    with CacheReader(out) as reader:  # what explore reads of a partial cache
        assert reader.status == "partial"
        np.testing.assert_array_equal(reader.ngrams(0, 1)[0].g_sum, fold.ngrams[1].g_sum)
    got = {"partial": read_state(out, "testing").layers[0]}
    monkeypatch.setattr(runs_module, "MERGE_PAIRS", 40)  # blocks of d_ffn + 1 pairs: dozens of chunks
    with ExitStack() as stack:
        sources = [stack.enter_context(h5py.File(segments_dir(out) / s.name))[runs_module.run_key(0, 1)]
                   for s in segments]
        chunks = list(runs_module.merged_chunks(sources, fold.ngram_counted, True))
    assert len(chunks) > 5 and all(a.gram[-1] < b.gram[0] for a, b in zip(chunks, chunks[1:]) if len(a) and len(b))
    write_state(out, _empty_state(final), schema.COMPLETE, runs=segments)
    assert sorted(p.name for p in segments_dir(out).iterdir()) == [s.name for s in segments]  # no scratch left
    got["complete"] = read_state(out, "testing").layers[0]
    for name, layer in got.items():
        for n in NGRAM_ORDERS:
            for column in ("gram", "neuron", "count") + (("g_sum",) if n in G_ORDERS else ()):
                np.testing.assert_array_equal(getattr(layer.ngrams[n], column), getattr(fold.ngrams[n], column),
                                              err_msg=f"{name} ngram{n}.{column}")
    # the test can fail: summing the runs in another order rounds differently
    reversed_sum = Sparse.reduce([read_run(tmp_path, s) for s in segments[::-1]], True).drop_neurons(fold.ngram_counted)
    assert not np.array_equal(reversed_sum.g_sum, fold.ngrams[1].g_sum)


def read_run(tmp_path, segment) -> Sparse:
    with h5py.File(segments_dir(tmp_path / "c.h5") / segment.name, "r") as f:
        group = f[runs_module.run_key(0, 1)]
        return Sparse(group["gram"][:], group["neuron"][:], group["count"][:], group["g_sum"][:])


# --- recordings: tiny Llama, 8 shards, some neurons without n-gram counts -----------------------------------
OPTIONS = dict(FAST, tau=0.0, ngram_max_freq=0.3)


def _record(out, model, data, log=None, **extra):
    config = RecordConfig(out=out, model=str(model), data=[str(data)], tokens=2048, **OPTIONS, **extra)
    return record(config, log=log or (lambda _m: None))


class _Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs (no except clause of the job catches it)."""


def _kill_at_segment(monkeypatch, nth: int):
    real, calls = executor.write_segment, [0]

    def killing(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nth:
            raise _Killed
        return out
    monkeypatch.setattr(executor, "write_segment", killing)


def _partial_writes(monkeypatch) -> list:
    real, seen = executor.write_state, []

    def counting(path, state, status, *args, **kwargs):
        seen.append(state.shards_done)
        return real(path, state, status, *args, **kwargs)
    monkeypatch.setattr(executor, "write_state", counting)
    return seen


@pytest.fixture(scope="module")
def whole(model_dirs, text_file, tmp_path_factory):
    """An uninterrupted recording, a checkpoint after every shard (the old cadence)."""
    out = tmp_path_factory.mktemp("whole") / "whole.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(executor.Recorder, "CHECKPOINT_RATIO", 0.0)
        state = _record(out, model_dirs["llama"], text_file)
    counted = state.layers[0].ngram_counted
    assert 0 < counted.sum() < len(counted)  # some neurons keep no counts
    assert state.meta["recording"]["n_shards"] == 8
    return out


def test_cadence_skips_checkpoints_when_compute_is_cheap(model_dirs, text_file, tmp_path, monkeypatch, whole):
    """A checkpoint only once the compute since the last one is CHECKPOINT_RATIO x its cost: with the
    ratio out of reach only the first (before any shard) is written; at 0 one after every shard but the
    last (the final write follows at once). Either way the cache is the same, pairs included."""
    seen = _partial_writes(monkeypatch)
    monkeypatch.setattr(executor.Recorder, "CHECKPOINT_RATIO", 1e9)
    state = _record(tmp_path / "rare.h5", model_dirs["llama"], text_file)
    assert seen == [0]
    assert_same_cache(whole, tmp_path / "rare.h5")
    assert len(state.layers[0].ngrams[2]) > 0  # the finished recording reads its pairs from the file
    seen.clear()
    monkeypatch.setattr(executor.Recorder, "CHECKPOINT_RATIO", 0.0)
    _record(tmp_path / "every.h5", model_dirs["llama"], text_file)
    assert seen == list(range(8))
    assert not segments_dir(tmp_path / "every.h5").exists()


def test_kill_between_checkpoints_resumes_from_the_last_and_cleans_up(model_dirs, text_file, tmp_path,
                                                                      monkeypatch, whole):
    """A kill after shard 5's segment, the last checkpoint after shard 2: the partial cache says 2 shards
    (pairs summed from the runs it names), the unnamed segments and runs of shards 3-5 (and a stray file)
    go at the resume, which carries the pairs over merged from the runs (never summed whole in memory),
    says where it starts and ends equal to the uninterrupted recording with no segment, run or scratch
    file left."""
    out = tmp_path / "killed.h5"
    # every shard is due (ratio 0), but only the checkpoint after shard 2 is written: the cadence's
    # skips, made deterministic
    monkeypatch.setattr(executor.Recorder, "CHECKPOINT_RATIO", 0.0)
    real_write = executor.write_state

    def after_two(path, state, status, *args, **kwargs):
        if state.shards_done not in (0, 2):
            return None  # not named: as if the cadence had skipped it
        return real_write(path, state, status, *args, **kwargs)
    monkeypatch.setattr(executor, "write_state", after_two)
    _kill_at_segment(monkeypatch, 5)
    with pytest.raises(_Killed):
        _record(out, model_dirs["llama"], text_file)
    partial = read_state(out, "testing")
    assert partial.shards_done == 2 and partial.status == "partial"
    assert partial.layers[0].ngrams[1].g_sum is not None and len(partial.layers[0].ngrams[2]) > 0
    left = sorted(p.name for p in segments_dir(out).iterdir())
    assert left == [f"{i:06d}.h5" for i in range(5)]  # 3-5 named by no checkpoint
    (segments_dir(out) / "000009.h5").write_bytes(b"left by a kill")  # a name we write: only those go

    monkeypatch.undo()
    lines = []

    def whole_in_memory(*args):
        raise AssertionError("the resume summed the checkpoint's pairs in memory")
    monkeypatch.setattr(store, "sum_runs", whole_in_memory)  # they are merged from the runs, streamed
    _record(out, model_dirs["llama"], text_file, log=lines.append, resume=True)
    monkeypatch.undo()
    assert any("recording from shard 3" in line for line in lines), lines
    assert_same_cache(whole, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["killed.h5", "killed.h5.progress.json"]
