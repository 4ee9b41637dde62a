"""Every file of ours is written whole, by one writer (`replacing`): into a temporary file beside it,
flushed to disk, renamed over it. A kill at any moment leaves the old file or the new one, never a
torn one; a failure removes the temporary and says, in one line, why and how much space is there.

A temporary is named `.NAME.PID.RANDOM[.TAG].tmp`: the random part makes each write's name its own
(two threads of one process writing one file never share a temporary) and one nobody can plant in
advance; it is created exclusively, never through a symlink. A recording's hidden states spilled to
disk go to `.NAME.PID[.RANDOM].hidden`. Both are known by the PID of their writer, so what a killed
writer leaves is found and removed (`stale_temporaries`). Whether a PID is still a live process, and
still the one we started, is decided here too (`process_alive`): stale temporaries, lock holders and
jobs use it.

Light on purpose (no numpy, no h5py): the progress file and `ffnscope jobs` use it.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from ffnscope.cache.errors import UserError

PROGRESS_SUFFIX = ".progress.json"  # a job's progress file beside its output (engine.jobs.progress)


# --- processes ------------------------------------------------------------------------------------
def process_alive(pid: int | None, command: list[str] | None = None) -> bool:
    """Whether `pid` is a live process: not gone, not a zombie (it writes nothing more) and, when the
    `command` it was started with is given, still running it where /proc says (so a reused pid is not
    taken for ours). Another user's process counts as alive."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:  # bigger than any pid
        return False
    if _proc_state(pid) == "Z":
        return False
    args = [str(a) for a in (command or [])[1:]]  # argv[0] differs between `ffnscope` and `python -m ffnscope`
    if args:
        cmdline = _cmdline(pid)
        if cmdline is not None and cmdline[-len(args):] != args:
            return False
    return True


def _proc_state(pid: int) -> str | None:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split() or [None])[0]
    except OSError:
        return None  # no /proc (or it went meanwhile): kill(pid, 0) has the last word


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0")[:-1]]


# --- temporaries ----------------------------------------------------------------------------------
SIDE_SUFFIXES = (".tmp", ".hidden")  # the files named by their writer's PID (see the module)


def _side_path(path: Path, suffix: str, tag: str = "") -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{tag}{suffix}")


def temp_path(path: Path, tag: str = "") -> Path:
    """A new temporary name to replace `path` with: hidden, beside it, this process's, this write's own."""
    return _side_path(path, ".tmp", tag)


def new_spill_file(path: Path) -> Path:
    """A new, empty file beside `path` for a recording of it to map its hidden states to (created
    exclusively, so never a file or symlink someone else put there, and readable by this user only: it
    holds what the model made of the data; the caller removes it)."""
    spill = _side_path(path, ".hidden")
    _create_new(spill, 0o600)
    return spill


def _create_new(path: Path, mode: int = 0o666) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode))


def stale_temporaries(path: Path) -> list[Path]:
    """Temporaries and spilled hidden states beside `path` and its progress file whose writer is dead
    (kill -9, a crash, a full disk before this check existed): files that are ours (`ours`: never a symlink,
    a hard link or a directory planted at such a name). Those of live processes (this one included) stay, and
    so do names we never write."""
    path = Path(path)
    progress = path.name + PROGRESS_SUFFIX
    # `.NAME.` and `.NAME.progress.json.` (temp_path); `NAME.progress.json.` from older versions
    prefixes = (f".{path.name}.", f".{progress}.", f"{progress}.")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    found = []
    for name in names:
        if not name.endswith(SIDE_SUFFIXES):
            continue
        for prefix in prefixes:
            digits = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
            if digits.isdigit() and int(digits) < 1 << 31:  # a bigger number is no pid we wrote
                if not process_alive(int(digits)) and ours(path.with_name(name)):
                    found.append(path.with_name(name))
                break
    return sorted(found)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the stale temporaries beside `path` (stale_temporaries); -> those removed."""
    return [tmp for tmp in stale_temporaries(path) if remove_ours(tmp)]


# --- what is ours to delete -----------------------------------------------------------------------
# A shared directory is hostile: what stands at one of our names may be a symlink, a hard link of someone's
# file or their directory. Such entries are never opened for writing, followed, nor deleted; a side file
# is deleted only when it is provably one we wrote (the caller checks its name is one we write).
def _uid_is_ours(st: os.stat_result) -> bool:
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def sole_file(st: os.stat_result) -> bool:
    """A regular file with no other name: truncating or deleting it touches nobody else's data (a symlink
    is never one, given lstat or an O_NOFOLLOW open's fstat; a hard link of someone's file has two names)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def ours(name: str | os.PathLike, dir_fd: int | None = None) -> bool:
    """A file we may delete: this user's sole_file (lstat, relative to `dir_fd` if given)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return sole_file(st) and _uid_is_ours(st)


def remove_ours(name: str | os.PathLike, dir_fd: int | None = None) -> bool:
    """Delete `name` if it is ours (ours); -> whether it went."""
    if not ours(name, dir_fd):
        return False
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        return False
    return True


def open_our_dir(directory: Path) -> int | None:
    """A descriptor of `directory` if it is a real directory of this user (opened without following a link,
    so what is checked is what is then used: with dir_fd, a swap for a symlink meanwhile changes nothing);
    None otherwise. The caller closes it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode) and _uid_is_ours(st):
        return fd
    os.close(fd)
    return None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links followed: a symlink or a hard link to it counts)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# --- writing --------------------------------------------------------------------------------------
def size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _free(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def storage_error(path: Path, needs: int | None = None, reason: str = "", failure: str | None = None) -> UserError:
    """The one line of a failed or impossible write: the path, why, the free space there and needed."""
    path = Path(path)
    free = _free(path.parent)
    parts = [reason] if reason else []
    if free is not None:
        parts.append(f"{size_text(free)} free there")
    if needs:
        parts.append(f"about {size_text(needs)} needed")
    head = failure or f"could not write {path}"
    space = not reason or "space" in reason.lower() or "quota" in reason.lower() or "errno = 28" in reason
    fix = "free some space or choose another place" if space else "check the place is writable"
    return UserError(f"{head} ({'; '.join(parts)}); {fix}, then run the command again (the previous file "
                     "is unchanged)")


def _reason(exc: BaseException) -> str:
    """One short line of why a write failed (h5py puts errno 28 in the text of a RuntimeError; numpy's tofile
    says only "N requested and M written")."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    if "No space left" in reason or "errno = 28" in reason:
        reason = "no space left on the device"
    elif " requested and " in reason and reason.endswith(" written"):
        reason = "a write was cut short: no space left on the device?"
    return (reason.splitlines() or [exc.__class__.__name__])[0][:200]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Flush a rename or link in `directory` to disk; best effort (a system that cannot open or sync a
    directory keeps the rename as its file system does)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class QuietFile:
    """A temporary as a library writes it through a file object (h5py's fileobj driver), whose failures the
    library never sees: the first is kept in `error`, later writes are dropped, and a read past what is on
    disk gives zeros (as HDF5's own driver reads past the end). HDF5 does not survive a failed write: its
    metadata cache stays half flushed, the file never closes, and the library's exit handler then crashes
    the process. The writer raises `error` once the library has closed the file (cache.store.replaced)."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))  # the temporary made, never a link put there
        self._file = open(fd, "r+b", buffering=0)
        self.error: OSError | None = None

    def __enter__(self) -> "QuietFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _keep(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def read(self, size: int) -> bytes:
        data = bytearray()
        try:
            while len(data) < size:
                chunk = self._file.read(size - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            self._keep(exc)
        return bytes(data.ljust(size, b"\0"))

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                while view:  # an unbuffered write may take part of it
                    view = view[self._file.write(view):]
            except OSError as exc:
                self._keep(exc)
        return len(data)

    def truncate(self, size: int) -> int:
        if self.error is None:
            try:
                self._file.truncate(size)
            except OSError as exc:
                self._keep(exc)
        return size

    def flush(self) -> None:
        """Nothing buffered here (the writer fsyncs the file once it is closed)."""

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:  # a network file system may report a failed write only now
            self._keep(exc)


@contextmanager
def _temporary(path: Path, tag: str = "", failure: str | None = None, need: int | None = None):
    """A new temporary for `path` (temp_path), created empty and exclusively (so it is no file or symlink
    someone else put there) and removed when the block ends. An OSError or RuntimeError becomes
    storage_error's one line (`failure` its head)."""
    tmp = temp_path(path, tag)
    try:
        _create_new(tmp)
    except OSError as exc:
        raise storage_error(path, need, _reason(exc), failure) from None
    try:
        yield tmp
    except (OSError, RuntimeError) as exc:
        raise storage_error(path, need, _reason(exc), failure) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replacing(path: Path, tag: str = "", copy: bool = False, failure: str | None = None, needs: int = 0):
    """The temporary path (temp_path, created empty) the block writes; when the block ends it is flushed
    to disk and renamed over `path`, and the rename flushed too. copy=True starts it as a copy of `path`.
    `needs`: bytes the block writes; with less room than that (plus the copy) the write is refused before
    it starts (HDF5 does not survive a full disk). An OSError or RuntimeError becomes storage_error's one
    line (`failure` its head); the temporary is removed on any failure."""
    path = Path(path)
    need = int(((path.stat().st_size if copy and path.exists() else 0) + needs) * 1.05) + (64 << 10)
    free = _free(path.parent)
    if needs and free is not None and free < need:
        raise storage_error(path, need, "not enough free space", failure)
    with _temporary(path, tag, failure, need if needs else None) as tmp:
        if copy:
            shutil.copyfile(path, tmp)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)


@contextmanager
def replaced_file(path: Path, mode: str = "w", tag: str = "", failure: str | None = None, **open_args):
    """An open file (open()'s mode and arguments) that replaces `path` whole when the block ends."""
    with replacing(path, tag, failure=failure) as tmp, open(tmp, mode, **open_args) as f:
        yield f


def write_text(path: Path, text: str, failure: str | None = None) -> None:
    """Replace `path` with `text` (UTF-8), whole."""
    with replaced_file(path, "w", failure=failure, encoding="utf-8") as f:
        f.write(text)


def create_text(path: Path, text: str, failure: str | None = None) -> bool:
    """Write `path` whole with `text` (UTF-8) only where no file is yet: one there (another writer's) is
    left as it is, since the temporary is linked into place, and a link never replaces. -> whether written."""
    path = Path(path)
    with _temporary(path, failure=failure) as tmp:
        tmp.write_text(text, encoding="utf-8")
        _fsync(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system (FAT, some network mounts): create it in place
            try:
                with open(path, "x", encoding="utf-8") as f:
                    f.write(text)
            except FileExistsError:
                return False
        _fsync_dir(path.parent)
    return True
