"""Kill-and-resume and part-and-merge both give the cache one uninterrupted run gives."""
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ffnscope.cache.merge import merge
from ffnscope.cache.state import ngram_drop_limit
from ffnscope.cache.errors import UserError
from ffnscope.cache.store import read_state, segments_dir, write_state
from ffnscope.engine.jobs.progress import read_progress
from tests.conftest import env_for_subprocess
from tests.fixtures.parts import synthetic_parts
from tests.helpers import EVERY_SHARD, assert_same_cache, record_tiny, start_until_shard

LONG = ["--tokens", "49152", "--seq-len", "32", "--shard-tokens", "1024", "--batch-tokens", "64",
        "--samples", "40", "--topk", "4", "--device", "cpu", "--quiet"]


def _record_cmd(model_dir, data, out, *extra):
    return [sys.executable, "-m", "ffnscope", "record", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), *LONG, *extra]



def _start_and_stop(cmd, out, sig, after_shards=3):
    """Start a recording, wait for some checkpoints, send `sig`; -> the process's exit code."""
    proc = start_until_shard(cmd, out, after_shards + 1)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def test_sigkill_then_resume_equals_uninterrupted(model_dirs, text_file, tmp_path):
    model_dir = model_dirs["llama"]
    whole, killed = tmp_path / "whole.h5", tmp_path / "killed.h5"
    subprocess.run(_record_cmd(model_dir, text_file, whole), env=env_for_subprocess(), check=True,
                   capture_output=True)
    _start_and_stop([sys.executable, "-c", EVERY_SHARD, *_record_cmd(model_dir, text_file, killed)[3:]], killed,
                    signal.SIGKILL)
    partial = read_state(killed, "testing")
    assert partial.status == "partial" and 0 < partial.shards_done < partial.meta["recording"]["n_shards"]
    done = subprocess.run(_record_cmd(model_dir, text_file, killed, "--resume"), env=env_for_subprocess(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_cache(whole, killed)


# Kills inside a checkpoint, at the call named (cache.store's function, its nth call): the shard's segment
# written but not yet named by a checkpoint; halfway through the checkpoint's own write (3rd shard's).
_KILL_AT = {"segment": ("write_segment", 3), "checkpoint": ("write_layer", 4 * 3 + 2)}
_KILLER = """import os, runpy, signal, sys
import ffnscope.cache.store as store
import ffnscope.engine.record.executor as executor
name, nth = sys.argv.pop(1), int(sys.argv.pop(1))
real, calls = getattr(store, name), [0]
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and name == "write_layer":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(store, name, killing)
setattr(executor, name, killing)
executor.Recorder.CHECKPOINT_RATIO = 0.0  # a checkpoint after every shard: the kills land where _KILL_AT says
sys.argv[0] = "ffnscope"
runpy.run_module("ffnscope", run_name="__main__")
"""


def test_kill_inside_a_checkpoint_then_resume_equals_uninterrupted(model_dirs, text_file, tmp_path):
    """SIGKILL between a shard's segment and the checkpoint naming it, and halfway through the
    checkpoint's own write: the partial cache is the previous checkpoint, readable; the resume equals
    an uninterrupted run (samples included) and leaves no temporary or segment behind."""
    model_dir = model_dirs["llama"]
    whole = tmp_path / "whole.h5"
    subprocess.run(_record_cmd(model_dir, text_file, whole), env=env_for_subprocess(), check=True,
                   capture_output=True)
    for where, (name, nth) in _KILL_AT.items():
        out = tmp_path / where / "killed.h5"
        out.parent.mkdir()
        cmd = _record_cmd(model_dir, text_file, out)
        killed = subprocess.run([sys.executable, "-c", _KILLER, name, str(nth), *cmd[3:]], env=env_for_subprocess(),
                                capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert read_state(out, "testing").shards_done == 2, where  # the checkpoint before the kill
        assert segments_dir(out).is_dir()
        if where == "checkpoint":
            assert list(out.parent.glob(f".{out.name}.*.tmp")), "the kill left no torn temporary"
            alone = tmp_path / "alone.h5"  # a partial cache copied without its segments says so
            alone.write_bytes(out.read_bytes())
            with pytest.raises(UserError, match="segment files are missing"):
                read_state(alone, "testing")
            alone.unlink()
        done = subprocess.run(cmd + ["--resume"], env=env_for_subprocess(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert_same_cache(whole, out)
        a, b = read_state(whole, "testing").samples, read_state(out, "testing").samples
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.acts, b.acts)
        assert _layout(whole) == _layout(out)
        assert sorted(p.name for p in out.parent.iterdir()) == ["killed.h5", "killed.h5.progress.json"], where


def test_sigint_stops_cleanly_and_resumes(model_dirs, text_file, tmp_path):
    out = tmp_path / "c.h5"
    cmd = _record_cmd(model_dirs["opt"], text_file, out)
    proc = _start_and_stop(cmd, out, signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert read_progress(out)["status"] == "stopped"
    assert read_state(out, "testing").status == "partial"
    done = subprocess.run(cmd + ["--resume"], env=env_for_subprocess(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_state(out, "testing").status == "complete"
    assert read_progress(out)["status"] == "complete"


def test_stop_after_shard_checkpoints_it_and_the_resume_equals_uninterrupted(model_dirs, text_file, tmp_path):
    """`ffnscope jobs --stop-after-shard OUT` (SIGUSR1): the recording ends the shard it is in, checkpoints
    it though the cadence would not (its ratio set out of reach here: no checkpoint but the first of its
    own), exits 130 saying so; the resume records only the shards after it and equals an uninterrupted run."""
    model_dir = model_dirs["llama"]
    whole, out = tmp_path / "whole.h5", tmp_path / "c.h5"
    subprocess.run(_record_cmd(model_dir, text_file, whole), env=env_for_subprocess(), check=True,
                   capture_output=True)
    never = EVERY_SHARD.replace("CHECKPOINT_RATIO = 0.0", "CHECKPOINT_RATIO = 1e12")
    assert never != EVERY_SHARD
    proc = start_until_shard([sys.executable, "-c", never, *_record_cmd(model_dir, text_file, out)[3:]], out, 3)
    asked = subprocess.run([sys.executable, "-m", "ffnscope", "jobs", "--stop-after-shard", str(out)],
                           env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert asked.returncode == 0 and "stop after its current shard" in asked.stdout, asked.stderr
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    partial = read_state(out, "testing")
    n_shards = partial.meta["recording"]["n_shards"]
    assert partial.status == "partial" and 3 <= partial.shards_done < n_shards  # the shard it was in, kept
    assert f"({partial.shards_done} of {n_shards} shards)" in " ".join(stderr.split())  # the message wraps
    assert read_progress(out)["status"] == "stopped"
    again = subprocess.run([sys.executable, "-m", "ffnscope", "jobs", "--stop-after-shard", str(out)],
                           env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"ffnscope: error: the recording on {out} is not running (stopped); nothing to stop"], again.stderr
    done = subprocess.run(_record_cmd(model_dir, text_file, out, "--resume"), env=env_for_subprocess(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"recording from shard {partial.shards_done + 1}" in done.stderr
    assert_same_cache(whole, out)


def test_stop_after_the_last_shard_completes_the_recording_and_runs_no_analysis(model_dirs, text_file, tmp_path,
                                                                               monkeypatch):
    """Asked during the last shard (here from the start: SIGUSR1's flag set), the recording completes (a
    stop there would keep less than finishing does) and what `record --analyze` runs after it does not."""
    from ffnscope.engine.jobs import stop as stop_module
    from ffnscope.engine.jobs.stop import Stopped
    from ffnscope.engine.record.config import RecordConfig
    from ffnscope.engine.record.job import record
    from tests.helpers import FAST

    monkeypatch.setattr(stop_module, "_after_shard", [True])
    out, after = tmp_path / "c.h5", []
    config = RecordConfig(out=out, model=str(model_dirs["opt"]), data=[str(text_file)], tokens=256,
                          **{**FAST, "shard_tokens": 256})
    with pytest.raises(Stopped):
        record(config, log=lambda _m: None, after=lambda state, progress, lm: after.append(state))
    assert read_state(out, "testing").status == "complete" and after == []
    assert read_progress(out)["status"] == "stopped"


def _relu_opt_with_ties(directory):
    """Tiny OPT (ReLU) whose neurons range from firing often to never: many top-k slots hold act 0
    exactly, ties that only the tie rule orders."""
    import torch

    from tests.tiny_models import FFN, build, save

    model = build("opt", 2, seed=3)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.fc1.bias.sub_(torch.linspace(0.0, 0.3, FFN))
            layer.fc1.bias[::8] = -100.0  # dead: every slot a tie at 0
    return save(model, directory)


def _layout(path):
    """Every dataset's name, shape, dtype, chunks and filters: what cache.store.write_state lays out."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, (obj.shape, obj.dtype.str, obj.chunks, obj.compression,
                                                              obj.compression_opts, obj.shuffle))
                     if isinstance(obj, h5py.Dataset) else None)
        out["attrs"] = sorted(f.attrs)
    return out


def _assert_same_contexts(path_a, path_b):
    a, b = read_state(path_a, "testing"), read_state(path_b, "testing")
    for index, layer in a.layers.items():
        for name in ("topk_value", "topk_index", "topk_g", "start_value", "start_index", "start_g"):
            np.testing.assert_array_equal(getattr(layer, name), getattr(b.layers[index], name),
                                          err_msg=f"{index}.{name}")


def test_merged_parts_equal_one_recording_with_ties(text_file, tmp_path):
    """Four parts, given out of order, merge to the cache one recording makes, top-k ties included:
    the recorder's per-batch top-k, resume and merge order ties by one rule."""
    model_dir = _relu_opt_with_ties(tmp_path / "relu_opt")
    record_tiny(tmp_path / "whole.h5", model_dir, [text_file], topk=16)  # of 24 sequences: room for zeros
    parts = [tmp_path / f"p{i}.h5" for i in range(1, 5)]
    for i, part in enumerate(parts, 1):
        record_tiny(part, model_dir, [text_file], topk=16, part=(i, 4))
    merged = merge([parts[2], parts[0], parts[3], parts[1]], tmp_path / "merged.h5")
    assert merged.meta["recording"]["parts"] == [[1, 4], [2, 4], [3, 4], [4, 4]]
    whole = read_state(tmp_path / "whole.h5", "testing")
    values = np.stack([layer.topk_value for layer in whole.layers.values()])
    # the data has ties for the rule to order: zeros among the top-k, in columns that also fire
    assert ((values[:, 1:] == values[:, :-1]) & np.isfinite(values[:, 1:])).sum() > 100
    assert ((values == 0).any(1) & (values > 0).any(1)).sum() >= 10
    assert_same_cache(tmp_path / "whole.h5", tmp_path / "merged.h5", float_rtol=1e-12)
    _assert_same_contexts(tmp_path / "whole.h5", tmp_path / "merged.h5")
    assert _layout(tmp_path / "whole.h5") == _layout(tmp_path / "merged.h5")
    # the merged cache says it is the whole recording
    assert read_state(tmp_path / "merged.h5", "testing").meta["recording"]["part"] == [1, 1]


def _folded(paths, out):
    """The reference merge: the parts read whole and added in data order (RecordingState.add)."""
    states = sorted((read_state(p, "testing") for p in paths), key=lambda s: int(s.data.seq_index[0]))
    for state in states[1:]:
        states[0].add(state)
    rec = states[0].meta["recording"]
    for layer in states[0].layers.values():
        layer.drop_ngrams_over(ngram_drop_limit(rec), rec["primary_index"])
    write_state(out, states[0], "complete")
    return out


def test_streamed_merge_equals_merge_in_memory(tmp_path):
    """The streaming merge writes what adding the parts whole writes, whatever the order given, also
    from a merged partial whose sequences interleave with the other parts; datasets laid out as
    write_state lays them out (compressed token streams included)."""
    parts = synthetic_parts(tmp_path, 4, layers=2, d_ffn=70, seq_len=16, seqs_per_part=80, samples_per_part=9)
    reference = _folded(parts, tmp_path / "reference.h5")
    merge(parts[::-1], tmp_path / "direct.h5")
    assert_same_cache(reference, tmp_path / "direct.h5")  # the same order of additions: exact
    merge([parts[2], parts[0]], tmp_path / "p13.h5")
    merged = merge([parts[3], tmp_path / "p13.h5", parts[1]], tmp_path / "merged.h5")
    assert merged.n_tokens == 4 * 80 * 16 and merged.meta["recording"]["part"] == [1, 1]
    assert_same_cache(reference, tmp_path / "merged.h5", float_rtol=1e-12)
    _assert_same_contexts(reference, tmp_path / "merged.h5")
    layout = _layout(reference)
    assert layout == _layout(tmp_path / "merged.h5")
    assert layout["data/tokens"][3] == "gzip"  # the streamed datasets got put_array's filters
    counted = read_state(reference, "testing").layers[0].ngram_counted
    in_every_part = np.logical_and.reduce([read_state(p, "testing").layers[0].ngram_counted for p in parts])
    assert 0 < counted.sum() < in_every_part.sum()  # the n-gram cap dropped some in the merge


def test_merge_refuses_overlap_and_strangers(model_dirs, text_file, tmp_path):
    from ffnscope.cache.errors import UserError

    record_tiny(tmp_path / "p1.h5", model_dirs["gpt2"], [text_file], part=(1, 2))
    record_tiny(tmp_path / "p1b.h5", model_dirs["gpt2"], [text_file], part=(1, 2))
    record_tiny(tmp_path / "other.h5", model_dirs["opt"], [text_file], part=(2, 2))
    record_tiny(tmp_path / "tau.h5", model_dirs["gpt2"], [text_file], part=(2, 2), tau=0.5)
    with pytest.raises(UserError, match="overlaps"):
        merge([tmp_path / "p1.h5", tmp_path / "p1b.h5"], tmp_path / "m.h5")
    with pytest.raises(UserError, match="another model"):
        merge([tmp_path / "p1.h5", tmp_path / "other.h5"], tmp_path / "m.h5")
    with pytest.raises(UserError, match="another taus|another primary_tau"):
        merge([tmp_path / "p1.h5", tmp_path / "tau.h5"], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_segments_left_beside_a_complete_cache_are_removed(tmp_path, model_dirs, text_file, capsys):
    """A kill between the final write and the segments' removal leaves the folder: the next command on the
    cache removes it, saying so; a partial cache's segments are its checkpoint's and stay."""
    from ffnscope.app.cli import main
    from ffnscope.cache.store import remove_stale_segments

    out = tmp_path / "c.h5"
    record_tiny(out, model_dirs["gpt2"], [text_file])
    leftover = segments_dir(out)
    leftover.mkdir()
    (leftover / "000000.h5").write_bytes(b"x")  # a shard's segment (only names we write are removed)
    assert main(["analyze", str(out), "--only", "dead"]) == 0
    assert not leftover.exists() and leftover.name in capsys.readouterr().err
    partial = tmp_path / "p.h5"
    state = read_state(out, "reading it")
    write_state(partial, state, "partial")
    segments_dir(partial).mkdir()
    assert not remove_stale_segments(partial) and segments_dir(partial).is_dir()
