"""The progress file a job keeps beside its output, so other processes (the TUI, `ffnscope jobs`)
can follow it: a small JSON document replaced whole (cache.atomic), at most a few times a second.
The job statuses are named here, and only here."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from ffnscope.cache.atomic import PROGRESS_SUFFIX, process_alive, write_text
from ffnscope.cache.errors import UserError
from ffnscope.engine.jobs.stop import forget_after_shard

RUNNING, STOPPED, FAILED, COMPLETE = "running", "stopped", "failed", "complete"  # what a job writes
INTERRUPTED = "interrupted"  # what a reader says of a running job whose process is gone (SIGKILL, reboot)
STATUSES = (RUNNING, STOPPED, FAILED, COMPLETE, INTERRUPTED)


def progress_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + PROGRESS_SUFFIX)


def read_progress(output: Path) -> dict | None:
    try:
        return json.loads(progress_path(output).read_text())
    except (OSError, ValueError):
        return None


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
    def __init__(self, output: Path, command: list[str], interval: float = 0.5):
        self.path = progress_path(output)
        self.interval = interval
        self.state = {"pid": os.getpid(), "status": RUNNING, "output": str(output), "command": command,
                      "started": time.time(), "phase": "starting"}
        self._last = 0.0
        self.update(force=True)

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
                try:
                    with open(self.path, "r+" if self.path.exists() else "w") as f:
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
            self.finish(STOPPED, stopped() if callable(stopped) else stopped)
            raise
        except UserError as exc:
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
