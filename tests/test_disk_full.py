"""A full disk at any point of a write is one line (`ffnscope: error: ...`, exit status 2): never a traceback,
an HDF5 error stack or a crashed process (HDF5 does not survive a failed write: cache.atomic.QuietFile). The
last checkpoint stays, nothing of ours is left but what a resume needs, and once there is room `record
--resume` completes the recording equal to one that never ran out.

The disk is a small tmpfs (mounting one needs root: skipped elsewhere), filled before the command, leaving N
bytes; or the moment HDF5 starts a given write, by the command itself (FILL_HOOK), so the room runs out part
way through HDF5's writes; or by a file growing at a racing pace while the command runs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import pytest

from tests.conftest import env_for_subprocess
from tests.disk import fill, tmpfs

SHAPE = ("--tokens", "512", "--seq-len", "32", "--shard-tokens", "128", "--samples", "8", "--device", "cpu",
         "--quiet")  # 4 shards of 4 sequences
FS_SIZE = "16m"  # the recording's peak use is a few MiB (its final write checks for the uncompressed size)
TMP = r"\.\d+\.[0-9a-f]+(?:\.[\w.-]+)?\.tmp"  # the tail of a temporary's name (cache.atomic.temp_path)
CHECKPOINT = rf"\.c\.h5{TMP}"  # the cache's own temporaries: every checkpoint and the final write


def segment(name: str) -> str:
    return rf"\.{name}\.h5{TMP}"


@pytest.fixture
def disk(tmp_path):
    """A tmpfs of FS_SIZE, unmounted after the test."""
    with tmpfs(tmp_path / "fs", FS_SIZE) as mount:
        yield mount


def in_process(*args) -> None:
    """A command that must succeed, run here (no torch import per run: the suite stays short)."""
    from ffnscope.app.cli import main

    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def model(model_dirs) -> Path:
    return model_dirs["opt"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, model, text_file) -> Path:
    """The recording every test's recording must end up equal to: one that never ran out of room."""
    out = tmp_path_factory.mktemp("whole") / "c.h5"
    in_process("record", "--model", model, "--data", text_file, "--out", out, *SHAPE)
    return out


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, whole) -> Path:
    out = tmp_path_factory.mktemp("analyzed") / "c.h5"
    shutil.copyfile(whole, out)
    in_process("analyze", out)
    return out


def record_args(model: Path, text: Path, out: Path) -> tuple:
    return ("record", "--model", model, "--data", text, "--out", out, *SHAPE)


# `python -c FILL_HOOK... PATTERN NTH LEAVE DISK ARGS...`: `ffnscope ARGS...` that fills DISK to LEAVE free bytes
# the moment HDF5 opens the NTH temporary whose name matches PATTERN (cache.atomic.QuietFile): after its room
# check, before its first byte, so the disk runs out part way through that write, the same way every time
FILL_HOOK = """import re, sys
from pathlib import Path
import ffnscope.cache.atomic as atomic
from tests.disk import fill
pattern, nth, leave, disk = re.compile(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
del sys.argv[1:5]
opened, seen = atomic.QuietFile.__init__, []
def fill_on_open(self, path):
    opened(self, path)
    if pattern.fullmatch(Path(path).name):
        seen.append(path)
        if len(seen) == nth:
            fill(disk, leave)
atomic.QuietFile.__init__ = fill_on_open
"""


def run(*args, fill_at: tuple | None = None, every_shard: bool = False) -> subprocess.CompletedProcess:
    """`ffnscope ARGS` in a process of its own (a crash shows in its exit status). fill_at: (pattern, nth,
    leave, disk) for FILL_HOOK; every_shard: a checkpoint after every shard, so the nth checkpoint is always
    the same one (tests.helpers.EVERY_SHARD)."""
    from tests.helpers import EVERY_SHARD

    hook = [FILL_HOOK, *map(str, fill_at)] if fill_at else []
    if every_shard or fill_at:
        tail = EVERY_SHARD if every_shard else "import runpy\nrunpy.run_module('ffnscope', run_name='__main__')\n"
        code = ["-c", (hook[0] if hook else "") + tail, *hook[1:]]
    else:
        code = ["-m", "ffnscope"]
    return subprocess.run([sys.executable, "-X", "faulthandler", *code, *map(str, args)], capture_output=True,
                          text=True, env=env_for_subprocess(), timeout=300)


class Racing:
    """Grow a file by `step` bytes every millisecond, from the moment the first segment appears, until the
    disk is full: where it runs out is left to the race."""

    def __init__(self, disk: Path, step: int):
        self.disk, self.step = disk, step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._grow, daemon=True)

    def _grow(self) -> None:
        segments = self.disk / ".c.h5.segments"
        while not self._stop.wait(0.0005):
            if segments.is_dir() and any(re.fullmatch(r"\d{6}\.h5", n) for n in os.listdir(segments)):
                break
        block = b"\1" * self.step
        with open(self.disk / "filler", "ab", buffering=0) as f:
            while not self._stop.wait(0.001):
                try:
                    f.write(block)
                except OSError:
                    return

    def __enter__(self) -> "Racing":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def assert_one_line(r: subprocess.CompletedProcess) -> str:
    """Exit status 2 and one error line, the storage error, last (after the command's own notes and progress
    lines) -> it."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    for noise in ("Traceback", "HDF5-DIAG", "Exception ignored", "Fatal Python error", "Segmentation fault"):
        assert noise not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert not [line for line in lines[:-1] if "error" in line.lower()], r.stderr
    assert lines[-1].startswith("ffnscope: error: ") and "free there" in lines[-1], r.stderr
    return lines[-1]


def named_segments(cache: Path) -> set[str]:
    """The segment files a checkpoint names: its virtual datasets' sources, through its maps and base."""
    names: set[str] = set()
    todo = [cache]
    while todo:
        found: set[str] = set()
        with h5py.File(todo.pop(), "r") as f:
            f.visititems(lambda _key, item: found.update(Path(s.file_name).name for s in item.virtual_sources())
                         if isinstance(item, h5py.Dataset) and item.is_virtual else None)
        todo += [cache.with_name(f".{cache.name}.segments") / name for name in found - names]
        names |= found
    return names


def assert_left_for_a_resume(disk: Path) -> None:
    """After a failed recording: its last checkpoint (partial, and readable; none when it failed before the
    first), the segments it names and the progress file; no temporary, scratch, lock or other segment."""
    from ffnscope.cache.store import read_state

    cache = disk / "c.h5"
    left = {str(p.relative_to(disk)) for p in disk.rglob("*") if p.name != "filler"}
    named = set()
    if cache.exists():
        assert read_state(cache, "testing").status == "partial"
        named = named_segments(cache)
    expected = {"c.h5.progress.json"} | ({"c.h5"} if cache.exists() else set()) | \
        ({".c.h5.segments"} if named else set()) | {f".c.h5.segments/{name}" for name in named}
    assert left == expected, sorted(left)


# Fill points of a recording: N (leave N bytes before it starts) or (PATTERN, NTH, LEAVE): as HDF5 starts
# the nth write of a temporary matching PATTERN (FILL_HOOK); every run checkpoints after every shard.
# A chain's points fail one after the other, each run resuming the checkpoint the one before left.
# Checkpoints in a run starting at shard s: the first (before any shard), one after each shard but the last,
# then the final write; a resume writes everything before s as one segment (`upto`) and pos_fire as a base.
CHAINS = {
    "before-any-checkpoint": [0, 8 << 10, 100 << 10, (CHECKPOINT, 1, 16 << 10)],
    "segments-and-checkpoints": [(segment("000000"), 1, 0), (segment("000001"), 1, 16 << 10),
                                 (CHECKPOINT, 2, 0), (CHECKPOINT, 3, 32 << 10)],
    "resume-upto-and-base": [(segment("000002"), 1, 0), (segment(r"upto\d{6}"), 1, 64 << 10),
                             (segment(r"base\d{6}"), 1, 0), (segment(r"base\d{6}"), 1, 16 << 10)],
    "final-write": [(CHECKPOINT, 5, 0), (CHECKPOINT, 2, 4 << 10), (CHECKPOINT, 2, 96 << 10)],
}


@pytest.mark.parametrize("chain", CHAINS)
def test_recording_runs_out_of_room(chain, disk, model, text_file, whole):
    from tests.helpers import assert_same_cache

    out = disk / "c.h5"
    for point in CHAINS[chain]:
        resume = ["--resume"] if out.exists() else []
        if isinstance(point, int):
            fill(disk, point)
            r = run(*record_args(model, text_file, out), *resume, every_shard=True)
        else:
            r = run(*record_args(model, text_file, out), *resume, fill_at=(*point, disk), every_shard=True)
        # a point filled as a write starts fails inside it; one filled before, at the room check
        assert ("no space left" in assert_one_line(r)) == (not isinstance(point, int)), r.stderr
        assert_left_for_a_resume(disk)
        os.unlink(disk / "filler")
    in_process(*record_args(model, text_file, out), *(["--resume"] if out.exists() else []))
    assert_same_cache(out, whole)
    assert sorted(p.name for p in disk.iterdir()) == ["c.h5", "c.h5.progress.json"]


@pytest.mark.parametrize("step", [96 << 10, 256 << 10])
def test_recording_racing_a_filling_disk(step, disk, model, text_file, whole):
    from tests.helpers import assert_same_cache

    out = disk / "c.h5"
    with Racing(disk, step):
        r = run(*record_args(model, text_file, out))
    if r.returncode != 0:  # else the recording won the race: it must be whole all the same
        assert_one_line(r)
        assert_left_for_a_resume(disk)
        os.unlink(disk / "filler")
        in_process(*record_args(model, text_file, out), *(["--resume"] if out.exists() else []))
    assert_same_cache(out, whole)


def test_inside_an_hdf5_write_with_no_room(disk):
    """The root of the crash, without a model: HDF5 writing into a file as the disk runs out (no room check
    before: `needs` not given), at several points of its writes. One line, the old file as it was, no
    temporary, and the process ends cleanly (it crashed at exit, in HDF5's own clean-up)."""
    script = """import sys
import numpy as np
from ffnscope.cache.errors import UserError
from ffnscope.cache.store import put_array, replaced
try:
    with replaced(sys.argv[1]) as f:
        f.attrs["meta"] = "x" * 50000
        for i in range(40):
            put_array(f, f"group{i % 7}/d{i}", np.arange(20000) * i, compress=i % 2 == 0)
            f.create_dataset(f"raw{i}", data=np.arange(3000))
except UserError as exc:
    print(f"ffnscope: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""
    target = disk / "c.h5"
    target.write_bytes(b"the previous file")
    for leave in (0, 8 << 10, 64 << 10, 256 << 10, 1 << 20):
        fill(disk, leave)
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script, str(target)], capture_output=True,
                           text=True, env=env_for_subprocess(), timeout=120)
        assert "no space left" in assert_one_line(r), leave
        assert target.read_bytes() == b"the previous file"
        assert sorted(p.name for p in disk.iterdir()) == ["c.h5", "filler"]
        os.unlink(disk / "filler")


# analyze, export and npl fit on a complete recording on the disk: (args, leave N bytes before, or
# (PATTERN, NTH, LEAVE) for FILL_HOOK: analyze's is the cache's copy, made, to which HDF5 adds the results)
ANALYSIS = rf"\.c\.h5{TMP}"
SIDECAR = rf"\.c\.h5\.npl\.h5{TMP}"
NPL = ("npl", "fit", "{cache}", "--device", "cpu", "--tokens", "4096", "--quiet")
OTHER_CASES = {
    "analyze-refused": (("analyze", "{cache}", "--only", "dead"), 0),
    "analyze-0": (("analyze", "{cache}", "--only", "dead", "ngrams"), (ANALYSIS, 1, 0)),
    "analyze-8k": (("analyze", "{cache}", "--only", "dead", "ngrams"), (ANALYSIS, 1, 8 << 10)),
    "export-csv": (("export", "{analyzed}", "--out", "{disk}/x.csv"), 0),
    "export-parquet": (("export", "{analyzed}", "--out", "{disk}/x.parquet"), 0),
    "export-jsonl-4k": (("export", "{analyzed}", "--out", "{disk}/x.jsonl"), 4 << 10),
    "npl-refused": (NPL, 0),
    "npl-sidecar-0": (NPL, (SIDECAR, 1, 0)),
    "npl-sidecar-16k": (NPL, (SIDECAR, 1, 16 << 10)),
}


@pytest.mark.parametrize("case", OTHER_CASES)
def test_other_writers_run_out_of_room(case, disk, whole, analyzed):
    args, point = OTHER_CASES[case]
    cache = disk / "c.h5"
    shutil.copyfile(whole, cache)
    before = cache.read_bytes()
    args = [a.format(cache=cache, analyzed=analyzed, disk=disk) for a in args]
    if isinstance(point, int):
        fill(disk, point)
        r = run(*args)
    else:
        r = run(*args, fill_at=(*point, disk))
    line = assert_one_line(r)
    assert isinstance(point, int) or "no space left" in line  # filled as HDF5 starts: it fails inside
    assert cache.read_bytes() == before
    left = sorted(p.name for p in disk.iterdir() if p.name != "filler")
    assert left in (["c.h5"], ["c.h5", "c.h5.progress.json"], ["c.h5", "c.h5.npl.h5.progress.json"]), left


def test_export_to_a_read_only_place(disk, analyzed):
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=30)
    for name in ("x.csv", "x.parquet"):
        r = run("export", analyzed, "--out", disk / name)
        assert "check the place is writable" in assert_one_line(r)
        assert "Read-only file system" in r.stderr
    assert not list(disk.iterdir())
