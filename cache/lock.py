"""One writer per file: an advisory lock (flock) on a hidden `.NAME.lock` beside the file, taken before
any of its state is read and held until the last rename. Writers (record, resume, analyze, merge, the
NPL sidecar) take it exclusive; a job that only reads a recording while writing elsewhere (npl on the
cache) takes it shared, so it never reads a file a recording is still writing. A second writer gets
one line naming the holder, never a wait. The lock file goes when its holder releases it."""
from __future__ import annotations

import fcntl
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ffnscope.cache.atomic import process_alive
from ffnscope.cache.errors import UserError


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _holder(lock: Path) -> str:
    """' (pid N)' of the writer that holds the lock; nothing when the pid in the file is not alive
    (a killed writer's, under a reader that now holds the file)."""
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() and process_alive(int(pid)) else ""


@contextmanager
def locked(path: Path, shared: bool = False):
    """Hold the lock of `path` for the block. A directory where no lock file can be made (missing,
    read-only) is not locked: the command then fails on its own, with its own one line."""
    lock = lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another ffnscope process{_holder(lock)} is working on {path}; wait for it to "
                            "finish (see `ffnscope jobs`) or stop it, then run this again") from None
        try:  # the holder before us may have removed the file as we opened it: lock the one at the path
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        try:
            if not shared:
                lock.unlink(missing_ok=True)  # still ours: nobody else holds a lock on it
            else:  # the last reader out removes it; a writer that comes meanwhile locks a new file
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    lock.unlink(missing_ok=True)
                except BlockingIOError:
                    pass
        finally:
            os.close(fd)


@contextmanager
def locked_all(exclusive: list[Path], shared: list[Path] = ()):
    """Several locks at once, in a fixed order (so two commands never wait on each other)."""
    wanted = {Path(p).resolve(): False for p in shared}
    wanted.update({Path(p).resolve(): True for p in exclusive})
    with ExitStack() as stack:
        for path in sorted(wanted):
            stack.enter_context(locked(path, shared=not wanted[path]))
        yield
