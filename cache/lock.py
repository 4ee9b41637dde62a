"""One writer per file: an advisory lock (flock) on a hidden `.NAME.lock` beside the file, taken before
any of its state is read and held until the last rename. Writers (record, resume, analyze, merge, the
NPL sidecar) take it exclusive; a job that only reads a recording while writing elsewhere (npl on the
cache) takes it shared, so it never reads a file a recording is still writing. A second writer gets
one line naming the holder, never a wait.

The lock file goes when the last holder releases it: a writer, or the last reader out, which takes it
exclusive for that moment, so nobody locks the file it removes. flock cannot convert a shared lock
atomically, and a reader coming in that moment finds the lock exclusive with no writer's pid in the
file (a writer writes its pid as soon as it holds the lock): such a reader waits that moment out
(LEAVING_S at most) instead of being refused."""
from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ffnscope.cache.atomic import process_alive, sole_file
from ffnscope.cache.errors import UserError

LEAVING_S = 2.0  # how long a reader waits out a lock held exclusive with no writer's pid in it (see above)


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
    deadline = time.monotonic() + LEAVING_S
    while True:
        try:  # never through a symlink: a writer truncates the file it locks
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{lock} is a symlink, not ffnscope's lock file; remove it, then run this "
                                "again") from None
            yield
            return
        if not sole_file(os.fstat(fd)):  # a hard link of someone's file (a writer truncates it), a fifo
            os.close(fd)
            raise UserError(f"{lock} is not ffnscope's lock file (another name of a file, or not a file); "
                            "remove it, then run this again")
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(lock)
            if shared and not holder and time.monotonic() < deadline:  # a reader leaving, a writer's first moment
                time.sleep(0.001)
                continue
            raise UserError(f"another ffnscope process{holder} is working on {path}; wait for it to finish "
                            "(see `ffnscope jobs`) or stop it, then run this again") from None
        try:  # the holder before us may have removed the file as we opened it: lock the one at the path
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        if not shared:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
            except OSError:  # a full disk: the lock holds without the pid (others' line then names none)
                pass
        yield
    finally:
        try:
            if shared:  # the last reader out: exclusive while it removes the file (fails while others read)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:  # never what replaced it
                lock.unlink()  # ours alone: one who opened it meanwhile finds it gone and retries
        except (BlockingIOError, FileNotFoundError):
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
