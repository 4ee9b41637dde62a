"""The progress file a job keeps beside its output, so other processes (the TUI, `ffnscope jobs`)
can follow it: a small JSON document replaced whole (cache.atomic), at most a few times a second.
The job statuses are named here, and only here."""
from __future__ import annotations

import json
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path

from ffnscope.cache.atomic import PROGRESS_SUFFIX, process_alive, remove_ours, replaced_file, sole_file, write_text
from ffnscope.cache.errors import UserError
from ffnscope.engine.jobs.stop import forget_after_shard

RUNNING, STOPPED, FAILED, COMPLETE = "running", "stopped", "failed", "complete"  # what a job writes
INTERRUPTED = "interrupted"  # what a reader says of a running job whose process is gone (SIGKILL, reboot)
STATUSES = (RUNNING, STOPPED, FAILED, COMPLETE, INTERRUPTED)


def progress_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + PROGRESS_SUFFIX)


MAX_PROGRESS_BYTES = 1 << 20  # a progress file is a few KB: a larger one is not ours, and is not read whole


def _progress_bytes(output: Path) -> bytes | None:
    """The progress file's bytes, or None: never through a symlink, never a FIFO or device (no wait on one),
    never more than MAX_PROGRESS_BYTES (anyone may plant a file beside a shared cache)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(progress_path(output), flags)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            data = f.read(MAX_PROGRESS_BYTES + 1)
        return data if len(data) <= MAX_PROGRESS_BYTES else None
    except OSError:
        return None


def read_progress(output: Path) -> dict | None:
    """The progress file's JSON (_progress_bytes), or None."""
    data = _progress_bytes(output)
    try:
        return None if data is None else json.loads(data)
    except (ValueError, RecursionError):
        return None


def own_progress(progress) -> bool:
    """Whether a progress file is this process's while it runs: what a launcher wrote for the job it started
    (its pid is the job's) or what the job wrote itself."""
    return isinstance(progress, dict) and progress.get("pid") == os.getpid() and progress.get("status") == RUNNING


def running_job(output: Path) -> int | None:
    """The pid of a live job that says it is writing `output`, if any."""
    progress = read_progress(output)
    if not isinstance(progress, dict) or progress.get("status") != RUNNING:
        return None
    pid, command = progress.get("pid"), progress.get("command")
    if type(pid) is not int or pid == os.getpid():
        return None
    # one that died without saying so (SIGKILL) left a stale file; its pid may be another program's now
    return pid if process_alive(pid, command if isinstance(command, list) else None) else None


class ProgressFile:
    """`defer`: the job calls start() once every up-front check passed, and a refusal before it leaves the
    progress file as it was (`outcome`). The file is written from the start all the same (so `jobs` shows a
    job whose model takes minutes to load), as a provisional one: a refusal removes it, or puts back the one
    that was there (an interrupted job's, which this was to resume, byte for byte). A file a launcher wrote
    for this very process (its pid, running) is the job's own: kept up from the start, so the launcher's UI
    follows every phase and a refusal is told there."""

    def __init__(self, output: Path, command: list[str], interval: float = 0.5, defer: bool = False):
        self.output, self.path = Path(output), progress_path(output)
        self.interval = interval
        self.state = {"pid": os.getpid(), "status": RUNNING, "output": str(output), "command": command,
                      "started": time.time(), "phase": "starting"}
        self._last = 0.0
        self._previous = _progress_bytes(output) if defer else None
        self.provisional = defer and not own_progress(read_progress(output))
        self.update(force=True)

    def start(self) -> None:
        """Every up-front check passed: the file is the job's for good."""
        self.provisional = False

    def withdraw(self) -> bool:
        """A refusal before start(): the provisional file goes, or the one it replaced comes back, if the file is
        still the one this job wrote; -> whether it did."""
        progress = read_progress(self.output)
        if not (self.provisional and own_progress(progress) and progress.get("started") == self.state["started"]):
            return False
        if self._previous is None:
            return remove_ours(self.path)
        try:
            with replaced_file(self.path, "wb") as f:
                f.write(self._previous)
        except UserError:  # a full disk: the refusal's own line says what went wrong
            return False
        return True

    def update(self, force: bool = False, **fields) -> None:
        self.state.update(fields)
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.state["updated"] = now
        text = json.dumps(self.state)
        try:
            write_text(self.path, text)
        except UserError:  # a full disk: the job goes on (or fails with its own one line), never a traceback
            if self.state.get("status") != RUNNING:  # its outcome must be read: overwrite in place
                try:  # never through a symlink
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
                    with os.fdopen(fd, "w") as f:
                        if sole_file(os.fstat(fd)):  # nor into a hard link of someone's file
                            f.write(text)
                            f.truncate()
                except OSError:
                    pass

    def finish(self, status: str, message: str = "") -> None:
        self.update(force=True, status=status, message=message)

    @contextmanager
    def outcome(self, stopped, stop_types: tuple = ()):
        """Mark the job stopped (ctrl-c, SIGTERM or one of `stop_types`) or failed, with a one-line
        reason, when the block raises, and re-raise. `stopped`: how to go on, or a function saying it.
        Completing is the caller's: only it knows the message. However the block ends, the job is over:
        a stop-after-shard request (SIGUSR1) that came during it is forgotten."""
        try:
            yield
        except (KeyboardInterrupt, *stop_types):
            if not self.withdraw():  # stopped before it started: nothing to resume, nothing to list
                self.finish(STOPPED, stopped() if callable(stopped) else stopped)
            raise
        except UserError as exc:
            if not self.withdraw():  # a refusal writes nothing
                self.finish(FAILED, one_line(str(exc)))
            raise
        except BaseException as exc:
            self.finish(FAILED, one_line(f"{exc.__class__.__name__}: {exc}"))
            raise
        finally:
            forget_after_shard()


def one_line(text: str) -> str:
    """The first non-empty line of a message (a progress file or a table row shows one line)."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), str(text).strip())
