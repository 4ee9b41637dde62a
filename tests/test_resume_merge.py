"""Kill-and-resume and part-and-merge both give the cache one uninterrupted run gives."""
import signal
import subprocess
import sys
import time

import pytest

from ffnscope.cache.merge import merge
from ffnscope.cache.store import read_state
from ffnscope.engine.progress import read_progress
from tests.conftest import env_for_subprocess
from tests.helpers import assert_same_cache, record_tiny

LONG = ["--tokens", "49152", "--seq-len", "32", "--shard-tokens", "1024", "--batch-tokens", "64",
        "--samples", "40", "--topk", "4", "--device", "cpu", "--quiet"]


def _record_cmd(model_dir, data, out, *extra):
    return [sys.executable, "-m", "ffnscope", "record", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), *LONG, *extra]


def _start_and_stop(cmd, out, sig, after_shards=3):
    """Start a recording, wait for some checkpoints, send `sig`; -> the process's exit code."""
    proc = subprocess.Popen(cmd, env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        progress = read_progress(out) or {}
        if progress.get("shard", 0) > after_shards:
            break
        if proc.poll() is not None:
            pytest.fail(f"recording ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def test_sigkill_then_resume_equals_uninterrupted(model_dirs, text_file, tmp_path):
    model_dir = model_dirs["llama"]
    whole, killed = tmp_path / "whole.h5", tmp_path / "killed.h5"
    subprocess.run(_record_cmd(model_dir, text_file, whole), env=env_for_subprocess(), check=True,
                   capture_output=True)
    _start_and_stop(_record_cmd(model_dir, text_file, killed), killed, signal.SIGKILL)
    partial = read_state(killed, "testing")
    assert partial.status == "partial" and 0 < partial.shards_done < partial.meta["recording"]["n_shards"]
    done = subprocess.run(_record_cmd(model_dir, text_file, killed, "--resume"), env=env_for_subprocess(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_cache(whole, killed)


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


def test_merged_parts_equal_one_recording(model_dirs, text_file, tmp_path):
    model_dir = model_dirs["gpt2"]
    record_tiny(tmp_path / "whole.h5", model_dir, [text_file])
    record_tiny(tmp_path / "p1.h5", model_dir, [text_file], part=(1, 2))
    record_tiny(tmp_path / "p2.h5", model_dir, [text_file], part=(2, 2))
    merged = merge([tmp_path / "p2.h5", tmp_path / "p1.h5"], tmp_path / "merged.h5")
    assert merged.meta["recording"]["parts"] == [[1, 2], [2, 2]]
    assert_same_cache(tmp_path / "whole.h5", tmp_path / "merged.h5", float_rtol=1e-12)
    # the merged cache says it is the whole recording
    assert read_state(tmp_path / "merged.h5", "testing").meta["recording"]["part"] == [1, 1]


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
