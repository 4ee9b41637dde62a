"""Shared test helpers: recording tiny models quickly and comparing caches."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np

from ffnscope.cache.store import read_state
from ffnscope.engine.jobs.progress import read_progress
from ffnscope.engine.record.config import RecordConfig
from ffnscope.engine.record.job import record
from tests.tiny_models import DETECTED

# token strings that must never reach a terminal or a spreadsheet as anything but text
HOSTILE = dict(zip(DETECTED, ("\x1b[31mred\x1b[0m", "=HYPERLINK(\"x\")\n[bold]b[/bold]\r\x00")))
FIXED_CREATED = "2026-01-02T03:04:05Z"  # so screenshots of a recording do not change with the day

FAST = dict(seq_len=32, shard_tokens=256, batch_tokens=64, samples=40, topk=4, device="cpu",
            calib_tokens=128)


# `python -c EVERY_SHARD ARGS...` is `ffnscope ARGS...` with a checkpoint after every shard
# (Recorder.CHECKPOINT_RATIO 0): a test that stops or kills a recording after shard k then always finds
# k shards kept, however cheap a tiny model's compute is against its checkpoints (the cadence is timing)
EVERY_SHARD = """import runpy, sys
import ffnscope.engine.record.executor as executor
executor.Recorder.CHECKPOINT_RATIO = 0.0
sys.argv[0] = "ffnscope"
runpy.run_module("ffnscope", run_name="__main__")
"""


def start_until_shard(cmd: list, out: Path, shard: int, timeout: float = 120) -> subprocess.Popen:
    """Start a recording command; -> its process once its progress file says it records shard `shard`
    (1-based). Fails the test if it ends or times out first."""
    import pytest  # here: bench/scale_sim.py imports this module without pytest at hand

    from tests.conftest import env_for_subprocess

    proc = subprocess.Popen(cmd, env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while (read_progress(out) or {}).get("shard", 0) < shard:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the recording never reached shard {shard}: {proc.communicate()[1][-800:]}")
        time.sleep(0.01)
    return proc


def record_tiny(out: Path, model: Path, data: list, tokens: int = 768, **overrides):
    options = {**FAST, **overrides}
    return record(RecordConfig(out=out, model=str(model), data=[str(d) for d in data], tokens=tokens,
                               **options), log=lambda _m: None)


def assert_same_cache(path_a: Path, path_b: Path, float_rtol: float = 0.0) -> None:
    """Every array of two caches equal (integers exactly, floats within float_rtol)."""
    a, b = read_state(path_a, "testing"), read_state(path_b, "testing")
    assert a.status == b.status
    assert a.layers.keys() == b.layers.keys()
    assert a.vocab == b.vocab and a.pieces == b.pieces
    for name in ("tokens", "seq_index", "domains", "unigram"):
        np.testing.assert_array_equal(getattr(a.data, name), getattr(b.data, name), err_msg=name)
    for n in a.data.grams:
        np.testing.assert_array_equal(a.data.grams[n].gram, b.data.grams[n].gram)
        np.testing.assert_array_equal(a.data.grams[n].count, b.data.grams[n].count)
    for index, la in a.layers.items():
        lb = b.layers[index]
        for name in ("fire_count", "pos_fire", "topk_index", "start_index"):
            np.testing.assert_array_equal(getattr(la, name), getattr(lb, name), err_msg=f"{index}.{name}")
        for name in ("g_sum", "g_sumsq", "g_max", "topk_value", "topk_g", "start_value", "start_g"):
            np.testing.assert_allclose(getattr(la, name), getattr(lb, name), rtol=float_rtol, atol=0,
                                       err_msg=f"{index}.{name}")
        if la.ngram_counted is not None:
            np.testing.assert_array_equal(la.ngram_counted, lb.ngram_counted)
            for n, sa in la.ngrams.items():
                for column in ("gram", "neuron", "count"):
                    np.testing.assert_array_equal(getattr(sa, column), getattr(lb.ngrams[n], column),
                                                  err_msg=f"{index}.ngram{n}.{column}")
                assert (sa.g_sum is None) == (lb.ngrams[n].g_sum is None)
                if sa.g_sum is not None:
                    np.testing.assert_allclose(sa.g_sum, lb.ngrams[n].g_sum, rtol=float_rtol, atol=0,
                                               err_msg=f"{index}.ngram{n}.g_sum")
    np.testing.assert_array_equal(a.samples.index, b.samples.index)
    np.testing.assert_allclose(a.samples.acts.astype(np.float32), b.samples.acts.astype(np.float32),
                               rtol=max(float_rtol, 1e-3) if float_rtol else 0)


def hostile_recording(directory: Path, text_file: Path) -> Path:
    """The planted OPT recorded and analyzed, with the detector's two trigger tokens renamed to
    hostile strings and a fixed creation date."""
    from ffnscope.cache import schema
    from ffnscope.cache.store import write_state
    from ffnscope.engine.analysis.job import analyze
    from tests.tiny_models import planted_opt, save

    model_dir = save(planted_opt(), directory / "model")
    cache = directory / "c.h5"
    record_tiny(cache, model_dir, [text_file], tokens=2048, ngram_max_freq=1.0)
    state = read_state(cache, "testing")
    for token, text in HOSTILE.items():
        state.vocab[token] = text
    state.meta["created"] = FIXED_CREATED
    write_state(cache, state, schema.COMPLETE)
    analyze(cache, log=lambda _m: None)
    return cache
