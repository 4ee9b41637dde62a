"""A disk that fills up, for the tests of full disks: a small tmpfs and a filler. Light (no torch, no h5py):
a command's own process imports it to fill the disk at a given write (tests/test_disk_full.py)."""
from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tmpfs(mount: Path, size: str):
    """A tmpfs of `size` (mount's syntax: 3m) at `mount`, made here, for the block; unmounted after. Mounting
    needs root: the test is skipped, saying so, where it is not permitted."""
    import pytest

    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int, name: str = "filler") -> None:
    """Fill the disk up to `leave` free bytes (tmpfs counts in pages: up to 4 KiB less)."""
    free = shutil.disk_usage(disk).free
    with open(disk / name, "ab") as f:
        try:
            f.write(b"\1" * max(0, free - leave))
        except OSError:  # full: what we wanted
            pass
