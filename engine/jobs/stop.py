"""Stopping a job cleanly: a StopToken is set (by SIGINT/SIGTERM, or by a caller from another thread)
and the job's loops check it between batches, raising Stopped there, so a stop always lands on a
consistent checkpoint.

A recording can also be asked to stop after its current shard (SIGUSR1: `ffnscope jobs --stop-after-shard`):
it then writes a checkpoint of that shard and stops, so a resume records nothing again, where a stop at the
next batch keeps only the last checkpoint the cadence wrote. Other jobs take no notice of it. The request
is for the job under way when it came (or the one the process is starting): a job's end forgets it
(engine.jobs.progress), so a process that records again (the Python API) does not stop its next recording."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Stopped(Exception):
    """SIGINT/SIGTERM arrived (or the caller asked), or SIGUSR1 and the shard is checkpointed; the last
    checkpoint stands and --resume continues from it."""


# SIGUSR1 before a job's token exists (the model still loading): app.cli sets it for the process's life
_after_shard = [False]


def request_after_shard(*_signal) -> None:
    """The SIGUSR1 handler: stop after the current shard (a signal handler: sets a flag, nothing else)."""
    _after_shard[0] = True


def forget_after_shard() -> None:
    """A job ended: a stop-after-shard request that came during it was for it, not for the next one."""
    _after_shard[0] = False


class StopToken:
    """A request to stop, set once by whoever may stop the job and read by its loops."""

    def __init__(self, requested: bool = False):
        self.requested = requested  # a plain bool: setting it from a signal handler takes no lock

    def request(self) -> None:
        self.requested = True

    @property
    def after_shard(self) -> bool:
        """A recording asked (SIGUSR1, to the process) to stop once its current shard is checkpointed."""
        return _after_shard[0]

    def check(self) -> None:
        """Raise Stopped if a stop was requested."""
        if self.requested:
            raise Stopped()


@contextmanager
def stop_on_signals(given: StopToken | None = None):
    """-> the job's StopToken. A caller that passes its own token stops the job itself: no handlers.
    Otherwise SIGINT/SIGTERM set a new one while the block runs, in the main thread only (only it may
    set handlers; a job run in another thread is stopped by its caller's token)."""
    if given is not None or threading.current_thread() is not threading.main_thread():
        yield given if given is not None else StopToken()
        return
    token = StopToken()
    previous = {s: signal.signal(s, lambda *_: token.request()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield token
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
