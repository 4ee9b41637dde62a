"""The next streamed layer's weights are read on a background thread while the current layer computes
(engine.model.runner.LayerRunner): it changes no number, and an error or a stop during the read ends the
job cleanly instead of hanging it."""
import faulthandler
import os
import signal
import threading
import time

import pytest

from ffnscope.engine.jobs.stop import Stopped
from ffnscope.engine.model.load import load_model
from ffnscope.engine.model.plan import layer_sizes
from ffnscope.engine.model.runner import LayerRunner
from ffnscope.engine.model.weights import LayerWeights
from ffnscope.engine.record.block import BlockRunner
from ffnscope.engine.record.executor import Recorder
from tests.helpers import assert_same_cache, record_tiny

PREFETCH = "ffnscope-prefetch"


@pytest.fixture
def no_hang():
    """A hang fails the test (with every thread's stack) instead of stalling the suite."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    assert not [t for t in threading.enumerate() if t.name.startswith(PREFETCH)]  # no read left running


def one_layer_budget(model_dir) -> int:
    fixed, per_layer = layer_sizes(load_model(str(model_dir)))
    return fixed + per_layer  # nothing resident: every layer read from the files at its turn


def spy_reads(monkeypatch, planted=None):
    """Records (layer, thread name) of each layer read; planted(index) runs first on the prefetch thread."""
    reads, real = [], LayerWeights.read

    def read(self, index, device="cpu", **kwargs):
        thread = threading.current_thread().name
        reads.append((index, thread))
        if planted is not None and thread.startswith(PREFETCH):
            planted(index)
        return real(self, index, device, **kwargs)
    monkeypatch.setattr(LayerWeights, "read", read)
    return reads


def test_prefetched_streaming_equals_all_resident(model_dirs, text_file, tmp_path, monkeypatch, no_hang):
    model_dir = model_dirs["llama"]
    record_tiny(tmp_path / "resident.h5", model_dir, [text_file])
    reads = spy_reads(monkeypatch)
    streamed = record_tiny(tmp_path / "streamed.h5", model_dir, [text_file], device_memory=one_layer_budget(model_dir))
    assert streamed.meta["recording"]["resident_layers"] == 0
    # layer 0 is read when its turn comes (nothing before it to overlap with); every later one in advance
    assert {i for i, thread in reads if thread.startswith(PREFETCH)} == {1, 2, 3}
    assert all(thread.startswith(PREFETCH) for i, thread in reads if i > 0)
    assert_same_cache(tmp_path / "resident.h5", tmp_path / "streamed.h5")


def test_an_error_in_the_prefetch_read_is_the_jobs_error(model_dirs, text_file, tmp_path, monkeypatch, no_hang):
    def planted(index):
        if index == 2:
            raise OSError("planted read failure")
    spy_reads(monkeypatch, planted)
    with pytest.raises(OSError, match="planted read failure"):  # raised, not waited on forever (no_hang)
        record_tiny(tmp_path / "c.h5", model_dirs["llama"], [text_file],
                    device_memory=one_layer_budget(model_dirs["llama"]))


def test_a_stop_during_a_prefetch_stops_cleanly_and_resumes(model_dirs, text_file, tmp_path, monkeypatch, no_hang):
    model_dir = model_dirs["llama"]
    budget = one_layer_budget(model_dir)
    whole = record_tiny(tmp_path / "whole.h5", model_dir, [text_file])
    shards, real_run_block, real_shards = [], BlockRunner.run, Recorder.record_shards

    def record_shards(self, *args, **kwargs):
        shards.append(0)  # from here on, run_block calls are shards (before: calibration)
        return real_shards(self, *args, **kwargs)

    def run_block(self, *args, **kwargs):
        if shards:
            shards[0] += 1
        return real_run_block(self, *args, **kwargs)
    monkeypatch.setattr(Recorder, "record_shards", record_shards)
    monkeypatch.setattr(BlockRunner, "run", run_block)
    waiting, stopped_waiting = threading.Event(), []
    real_weights, real_wait = LayerRunner.weights, LayerRunner._wait

    def weights(self, index, *args):
        if shards and shards[0] == 2 and index == 2:
            waiting.set()  # the main thread goes on to wait for layer 2's read
        return real_weights(self, index, *args)

    def wait(self, future, stop):
        try:
            return real_wait(self, future, stop)
        except Stopped:
            stopped_waiting.append(future.done())
            raise
    monkeypatch.setattr(LayerRunner, "weights", weights)
    monkeypatch.setattr(LayerRunner, "_wait", wait)

    def planted(index):  # the second shard's read of layer 2: SIGTERM comes while the main thread waits for it
        if shards and shards[0] == 2 and index == 2:
            assert waiting.wait(30)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    spy_reads(monkeypatch, planted)
    out = tmp_path / "stopped.h5"
    with pytest.raises(Stopped):
        record_tiny(out, model_dir, [text_file], device_memory=budget)
    assert shards[0] == 2 and stopped_waiting == [True]  # stopped from the wait, the read finished first
    monkeypatch.undo()
    resumed = record_tiny(out, model_dir, [text_file], device_memory=budget, resume=True)
    assert resumed.meta["recording"]["n_shards"] == whole.meta["recording"]["n_shards"] >= 3
    assert_same_cache(tmp_path / "whole.h5", out)
