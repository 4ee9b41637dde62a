"""What killed writers leave beside a recording goes with the next command on it: temporaries, and the
shard-sized file a recording spills its hidden states to (issue 18, 6)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from ffnscope.cache import atomic
from ffnscope.engine.model.load import load_model
from ffnscope.engine.model.plan import host_fixed_bytes
from tests.conftest import env_for_subprocess
from tests.helpers import record_tiny
from tests.test_errors import run_cli

# the recording killed (8 shards: long enough to be caught spilling) and the probe that finds its memory
SETTINGS = ["--tokens", "8192", "--seq-len", "32", "--shard-tokens", "1024", "--batch-tokens", "64", "--samples", "40",
            "--topk", "4"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_recording_killed_while_spilling_leaves_nothing_after_the_next_command(model_dirs, text_file, tmp_path):
    """kill -9 while the hidden states are in their memory-mapped file: the file (a shard's size) stays,
    and the next command on the recording removes it and says so."""
    model_dir = model_dirs["opt"]
    # room for weights and statistics but not for a shard's hidden states (tests/test_streaming.py)
    (tmp_path / "probe").mkdir()
    probe = record_tiny(tmp_path / "probe" / "p.h5", model_dir, [text_file], tokens=8192, shard_tokens=1024)
    tight = host_fixed_bytes(load_model(str(model_dir)), probe.meta) + 1000
    out = tmp_path / "c.h5"
    proc = subprocess.Popen([sys.executable, "-m", "ffnscope", "record", "--model", str(model_dir), "--data",
                             str(text_file), "--out", str(out), *SETTINGS, "--device", "cpu",
                             "--host-memory", str(tight), "--device-memory", str(1 << 40), "--quiet"],
                            env=env_for_subprocess(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".c.h5.*.hidden")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no spill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    spilled = list(tmp_path.glob(".c.h5.*.hidden"))
    assert spilled and spilled[0].stat().st_size > 0  # what a kill -9 leaves
    r = run_cli("analyze", out)
    assert "Traceback" not in r.stderr
    assert f"removed 1 temporary file that killed writers left beside {out}: {spilled[0].name}" in r.stderr, r.stderr
    assert not list(tmp_path.glob(".c.h5.*.hidden"))


@pytest.mark.parametrize("command", ["record", "analyze", "merge", "npl", "export"])
def test_every_command_on_a_recording_removes_its_stale_spills(tmp_path, command):
    """Any command on the recording's path (written or read) sweeps beside it; only files of dead writers
    go (here the commands then fail on their own, with one line: no such recording)."""
    cache = tmp_path / "c.h5"
    dead = _dead_pid()
    stale = [tmp_path / f".c.h5.{dead}.hidden", tmp_path / f".c.h5.{dead}.1a2b3c4d.hidden"]
    live = tmp_path / f".c.h5.{os.getpid()}.hidden"
    for path in (*stale, live):
        path.write_bytes(b"\0" * 4096)
    args = {"record": ["record", "--model", tmp_path / "no-model", "--data", tmp_path / "t.txt", "--tokens", "64",
                       "--out", cache],
            "analyze": ["analyze", cache], "merge": ["merge", cache, tmp_path / "d.h5", "--out", tmp_path / "m.h5"],
            "npl": ["npl", "show", cache], "export": ["export", cache, "--out", tmp_path / "t.csv"]}[command]
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "removed 2 temporary files" in r.stderr, r.stderr
    assert not any(p.exists() for p in stale) and live.exists()


def test_only_our_own_files_of_dead_writers_are_stale(tmp_path, monkeypatch):
    """Temporaries (this version's names and older ones) and spills of dead writers are stale; a live
    writer's (this process), a symlink, another user's file and names we never write are not."""
    out = tmp_path / "c.h5"
    dead = _dead_pid()
    stale = [tmp_path / f".c.h5.{dead}.tmp", tmp_path / f".c.h5.{dead}.0a1b2c3d.tmp",
             tmp_path / f".c.h5.{dead}.0a1b2c3d.analysis.tmp", tmp_path / f".c.h5.progress.json.{dead}.0a1b2c3d.tmp",
             tmp_path / f".c.h5.{dead}.hidden", tmp_path / f".c.h5.{dead}.0a1b2c3d.hidden"]
    kept = [atomic.temp_path(out), atomic.new_spill_file(out), tmp_path / f".c.h5.{dead}.other",
            tmp_path / f".d.h5.{dead}.hidden", tmp_path / ".c.h5.x.hidden"]
    for path in stale + kept:
        path.write_bytes(b"x")
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    link = tmp_path / f".c.h5.{dead}.9f8e7d6c.hidden"
    link.symlink_to(target)
    assert atomic.stale_temporaries(out) == sorted(stale)
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # as if they were another user's
    assert atomic.stale_temporaries(out) == []
    monkeypatch.undo()
    assert atomic.remove_stale_temporaries(out) == sorted(stale)
    assert all(p.exists() for p in kept) and link.is_symlink() and target.read_bytes() == b"keep"
