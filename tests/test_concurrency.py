"""Concurrent users of one file or one process: readers sharing a lock, writes flushed with their directory,
temporaries of two threads, a stop-after-shard request in a process that records twice, and the
launcher's first progress file against the job's own (issue 18, 9a-e)."""
import fcntl
import json
import os
import threading
from pathlib import Path

import pytest

from ffnscope.cache import atomic
from ffnscope.cache.errors import UserError
from ffnscope.engine.jobs.progress import progress_path, read_progress
from tests.helpers import FAST


def test_a_reader_leaving_never_refuses_a_reader_coming(tmp_path, monkeypatch):
    """Readers share a recording's lock: one coming while another holds it, or while the last one out holds
    it exclusive to remove the lock file (flock converts shared to exclusive by dropping the lock first),
    gets in; the lock file goes with the last of them."""
    from ffnscope.cache.lock import lock_path, locked

    path = tmp_path / "c.h5"
    real_flock, arrivals, tried = fcntl.flock, [], threading.Event()
    main = threading.current_thread()

    def arrive():
        try:
            with locked(path, shared=True):
                arrivals.append("in")
        except UserError as exc:
            arrivals.append(str(exc))

    def flock(fd, operation):
        try:
            real_flock(fd, operation)
        finally:
            if threading.current_thread() is not main:
                tried.set()
        if threading.current_thread() is main and operation & fcntl.LOCK_EX:
            coming = threading.Thread(target=arrive)  # while the release holds it exclusive, a reader comes
            coming.start()
            tried.wait(10)
            threads.append(coming)

    threads = []
    with locked(path, shared=True):
        arrive()
        monkeypatch.setattr(fcntl, "flock", flock)
    for thread in threads:
        thread.join(10)
    monkeypatch.undo()
    assert threads and arrivals == ["in", "in"], arrivals
    assert not lock_path(path).exists()
    with locked(path):  # a writer once they are gone
        pass


def test_a_replaced_file_is_flushed_with_its_directory(tmp_path, monkeypatch):
    """The rename is durable too: the directory is flushed after it (a crash then cannot bring back the
    old file's name), for a replaced file and a file created only where none is."""
    events = []

    def spy(name, real, event):
        monkeypatch.setattr(os, name, lambda *args: (events.append(event(*args)), real(*args))[1])

    spy("replace", os.replace, lambda _src, dst: ("rename", Path(dst)))
    spy("link", os.link, lambda _src, dst: ("rename", Path(dst)))
    spy("fsync", os.fsync, lambda fd: ("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
    directory = tmp_path.resolve()
    for name in ("write_text", "create_text"):
        events.clear()
        path = directory / f"{name}.json"
        getattr(atomic, name)(path, "{}")
        assert ("fsync", directory) in events, events
        assert events.index(("fsync", directory)) > events.index(("rename", path)), events


def test_two_threads_writing_one_file_use_their_own_temporaries(tmp_path):
    """Two writers of one file in one process (the app's export workers are threads): each write has a
    temporary of its own, so both succeed and the file is one of them, whole."""
    path = tmp_path / "t.csv"
    both_inside, errors = threading.Barrier(2, timeout=30), []

    def write(text):
        try:
            with atomic.replaced_file(path) as f:
                f.write(text)
                both_inside.wait()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c * 5000,)) for c in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert path.read_text() in ("a" * 5000, "b" * 5000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_a_stop_after_shard_request_stops_only_the_recording_it_came_during(model_dirs, text_file, tmp_path,
                                                                            monkeypatch):
    """A process that records twice (the Python API): SIGUSR1 during the first recording, midway (it stops)
    or in its last shard (it completes), does not stop the second one after its first shard."""
    from ffnscope.cache.store import read_state
    from ffnscope.engine.jobs import stop as stop_module
    from ffnscope.engine.jobs.stop import Stopped, request_after_shard
    from ffnscope.engine.record.config import RecordConfig
    from ffnscope.engine.record.job import record

    monkeypatch.setattr(stop_module, "_after_shard", [False])

    def run(out, on_progress=None):
        return record(RecordConfig(out=out, model=str(model_dirs["opt"]), data=[str(text_file)], tokens=768, **FAST),
                      log=lambda _m: None, on_progress=on_progress)

    for shard in (1, 3):  # of 3
        first = tmp_path / f"first{shard}.h5"
        if shard < 3:
            with pytest.raises(Stopped):
                run(first, lambda fields, shard=shard: fields.get("shard") == shard and request_after_shard())
        else:
            run(first, lambda fields, shard=shard: fields.get("shard") == shard and request_after_shard())
        assert read_state(first, "testing").status == ("partial" if shard < 3 else "complete")
        second = tmp_path / f"second{shard}.h5"
        run(second)
        assert read_state(second, "testing").status == "complete"


class _Child:
    """A job process as subprocess.Popen starts it; it writes its own progress file beside `output` at once
    (`writes` "at once") or when the launcher reads the file ("while the launcher reads")."""
    pid = 4_000_000  # above any pid_max: never a live process
    output: Path = None
    writes: str = None

    def __init__(self, *_args, **_kwargs):
        if _Child.writes == "at once":
            _Child.write()

    def poll(self):
        return None

    @classmethod
    def write(cls):
        cls.writes = None
        atomic.write_text(progress_path(cls.output), json.dumps({"pid": cls.pid, "status": "running",
                                                                 "phase": "loading model"}))


@pytest.mark.parametrize("writes", ["at once", "while the launcher reads", "later"])
def test_the_launchers_first_progress_file_never_replaces_the_jobs_own(tmp_path, monkeypatch, writes):
    """The job may write its progress file before the launcher writes the first one (it has to import torch
    first, but a loaded machine may let it): the launcher's never replaces it, and replaces an earlier
    job's file."""
    from ffnscope.engine.jobs import launcher

    out = tmp_path / "c.h5"
    atomic.write_text(progress_path(out), json.dumps({"pid": 1, "status": "stopped", "phase": "recording"}))
    real_read = launcher.read_progress

    def read_then_child_writes(output):
        found = real_read(output)
        if _Child.writes == "while the launcher reads":
            _Child.write()
        return found

    monkeypatch.setattr(_Child, "output", out)
    monkeypatch.setattr(_Child, "writes", writes)
    monkeypatch.setattr(launcher.subprocess, "Popen", _Child)
    monkeypatch.setattr(launcher, "read_progress", read_then_child_writes)
    monkeypatch.setattr(launcher, "_children", {})
    launcher._launch(out, ["record", "--out", str(out)])
    progress = read_progress(out)
    assert progress["pid"] == _Child.pid
    assert progress["phase"] == ("starting" if writes == "later" else "loading model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5.log", "c.h5.progress.json"]
