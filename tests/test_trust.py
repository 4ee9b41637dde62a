"""Trusting a shared cache (issue 13): pickle weights refused by default, model specs stored as absolute
paths, untrusted text (cache metadata, progress files, paths) escaped in every command's output,
stale temporaries of dead writers removed, storage failures as one line."""
from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import env_for_subprocess
from tests.disk import fill, tmpfs
from tests.test_errors import SMALL, assert_one_line_error, good_cache, run_cli  # noqa: F401


# --- 1. pickle weights ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory) -> Path:
    """A tiny OPT whose only weights are a pickle checkpoint (pytorch_model.bin)."""
    import torch
    from safetensors.torch import load_file

    from tests.tiny_models import build, save

    directory = save(build("opt", 2), tmp_path_factory.mktemp("pickle") / "model")
    weights = directory / "model.safetensors"
    torch.save(load_file(weights), directory / "pytorch_model.bin")
    weights.unlink()
    return directory


def test_pickle_weights_are_refused_by_default(tmp_path, pickle_model, text_file):
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", pickle_model, "--data", text_file, "--out", out, *SMALL)
    assert_one_line_error(r, "pickle", "pytorch_model.bin", "save_pretrained", "--allow-pickle")
    assert not out.exists() or h5py.File(out, "r").attrs["status"] != "complete"


def test_pickle_weights_with_allow_pickle(tmp_path, pickle_model, text_file):
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", pickle_model, "--data", text_file, "--out", out, *SMALL, "--allow-pickle")
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete"


def test_safetensors_beside_a_pickle_file_are_the_ones_loaded(tmp_path, pickle_model):
    """A directory with both: safetensors only, the pickle file never opened."""
    from ffnscope.engine.model.load import load_model
    from tests.tiny_models import build, save

    directory = save(build("opt", 2, seed=1), tmp_path / "both")
    (directory / "pytorch_model.bin").write_bytes(b"not a pickle at all")  # would fail if it were read
    assert load_model(str(directory)).adapter is not None


# --- 2. model specs stored absolute ---------------------------------------------------------------
def test_relative_model_spec_is_stored_absolute(tmp_path, model_dirs, text_file, monkeypatch):
    from ffnscope.cache.reader import CacheReader
    from ffnscope.engine.analysis.job import analyze
    from tests.helpers import record_tiny

    work = tmp_path / "work"
    shutil.copytree(model_dirs["opt"], work / "model")
    monkeypatch.chdir(work)
    record_tiny(Path("c.h5"), "./model", [text_file], tokens=256)
    with CacheReader(work / "c.h5") as reader:
        model = reader.meta["model"]
    assert model["spec"] == str((work / "model").resolve())
    assert model["spec_given"] == "./model"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    status = analyze(work / "c.h5", log=lambda _m: None)  # suppression reloads the model from the cache
    assert status["suppression"] != "skipped"
    r = run_cli("info", work / "c.h5", env_extra={"COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    assert "./model (" in r.stdout  # the spelling given is shown, with where it was found


# --- 3. untrusted text in every command's output --------------------------------------------------
EVIL = {
    "name": "[bold]evil[/bold]\x1b]0;title\x07\x1b[2J",
    "spec": "/m/\x1b[31mred\x9b2J",
    "firing_rule": "relu[/i] > 0 \x1b[5m\r\x00",
    "domain": "\x1b[31mdom\u202e",
    "source": "/data/\x1b]8;;http://x\x07link\x1b]8;;\x07",
}
CONTROL = set(range(0x20)) - {0x0A} | {0x7F}


def _assert_no_control(raw: bytes, what: str) -> str:
    raw = raw.replace(b"\r\n", b"\n")  # a pty's own line ends
    bad = sorted({b for b in raw if b in CONTROL})
    assert not bad, f"{what}: control bytes {bad} in {raw[:2000]!r}"
    text = raw.decode("utf-8")
    assert not any(0x80 <= ord(ch) <= 0x9F or ord(ch) in (0x202E, 0x2028) for ch in text), f"{what}: {text!r}"
    return text


def _in_pty(*args, cwd=None) -> tuple[int, bytes]:
    """Run the CLI with stdout and stderr on a pseudo-terminal (TERM=dumb: rich writes no escapes of
    its own, so any control byte comes from the data) and return its exit code and raw bytes."""
    master, slave = pty.openpty()
    env = env_for_subprocess()
    env.update(TERM="dumb", COLUMNS="200", LINES="50")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "ffnscope", *map(str, args)], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks)


@pytest.fixture(scope="module")
def evil_cache(hostile_cache, tmp_path_factory) -> Path:
    """The hostile recording (hostile token strings, analyzed) with crafted metadata on top."""
    path = tmp_path_factory.mktemp("evil") / "evil.h5"
    shutil.copyfile(hostile_cache, path)
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta["model"].update(name=EVIL["name"], spec=EVIL["spec"], spec_given=EVIL["spec"])
        meta["recording"]["firing_rule"] = EVIL["firing_rule"]
        meta["data"]["domain_names"] = [EVIL["domain"], *meta["data"]["domain_names"][1:]]
        meta["data"]["sources"][0]["path"] = EVIL["source"]
        f.attrs["meta"] = json.dumps(meta)
    return path


@pytest.mark.parametrize("command", ["info", "report"])
def test_hostile_metadata_never_reaches_the_terminal(evil_cache, command):
    rc, raw = _in_pty(command, evil_cache)
    text = _assert_no_control(raw, command)
    assert rc == 0, text
    assert "[bold]evil[/bold]" in text  # markup printed literally, not rendered
    assert "relu[/i] > 0" in text  # and not a MarkupError
    assert "\\x1b" in text  # the escapes are shown, not obeyed
    if command == "info":
        assert "\\x1b[31mdom" in text and "\\x1b]8;;http" in text


def test_hostile_markdown_export_and_path(evil_cache, tmp_path):
    out = tmp_path / "out\x1b]0;t\x07.md"
    rc, raw = _in_pty("export", evil_cache, "--format", "markdown", "--out", out)
    _assert_no_control(raw, "export")
    assert rc == 0, raw
    _assert_no_control(out.read_bytes(), "markdown file")


def test_hostile_progress_files(tmp_path):
    base = {"pid": 999_999_999, "started": 1.0, "updated": 2.0, "tokens_done": 5, "tokens_total": 10}
    files = {
        "a.h5": {**base, "status": "failed", "phase": "\x1b]0;pwn\x07[bold]phase", "message": "\x1b[2J[red]boom\rX",
                 "output": "\x1b[31m", "command": ["ffnscope", "record", "--out", "\x1b[31mx"]},
        "b.h5": {**base, "status": "running", "phase": "analyzing", "analysis": "\x07\x1b[5mdead[/]",
                 "command": ["ffnscope", "analyze", "\x1b[1m"]},
        "c\x1b[31m.h5": {**base, "status": "\x1b[31mweird[/x]", "phase": "\x00", "message": "\x9b2J"},
    }
    for name, progress in files.items():
        (tmp_path / f"{name}.progress.json").write_text(json.dumps(progress))
    rc, raw = _in_pty("jobs", tmp_path)
    text = _assert_no_control(raw, "jobs")
    assert rc == 0, text
    assert "[bold]phase" in text or "[bold]" in text.replace("\n", "")


def test_error_messages_escape_paths(tmp_path):
    rc, raw = _in_pty("info", tmp_path / "no\x1b]0;t\x07such.h5")
    text = _assert_no_control(raw, "error")
    assert rc == 2 and "ffnscope: error: cache not found" in text and "Traceback" not in text


# --- 4. stale temporaries and storage failures ----------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path, good_cache):
    from ffnscope.cache.atomic import remove_stale_temporaries

    out = tmp_path / "x.csv"
    dead = _dead_pid()
    stale = [tmp_path / f".x.csv.{dead}.tmp", tmp_path / f".x.csv.{dead}.analysis.tmp",
             tmp_path / f".x.csv.progress.json.{dead}.tmp",  # the progress file's
             tmp_path / f"x.csv.progress.json.{dead}.tmp"]  # the progress file's, by older versions
    live = [tmp_path / f".x.csv.{os.getpid()}.tmp", tmp_path / f".other.csv.{dead}.tmp",
            tmp_path / ".x.csv.notapid.tmp", tmp_path / f".x.csv.{2**40}.tmp"]
    for path in stale + live:
        path.write_bytes(b"x" * 100)
    r = run_cli("export", good_cache, "--table", "layers", "--out", out)
    assert r.returncode == 2 or r.returncode == 0, r.stderr  # (no analyses: a one-line error is fine)
    lines = [line for line in r.stderr.splitlines() if line.startswith("ffnscope: removed")]
    assert len(lines) == 1 and "removed 4 temporary files" in lines[0], r.stderr
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in live)  # a live writer's (this process), another file's, not ours
    assert remove_stale_temporaries(out) == []


def test_every_writer_uses_the_one_atomic_writer(tmp_path, good_cache, monkeypatch):
    """Caches, NPL sidecars, exports, progress files and the launcher's progress files all replace
    their file through cache.atomic, with temporaries that stale-temporary cleanup recognises."""
    from ffnscope.cache import atomic, schema
    from ffnscope.cache.npl_store import NplFile, write_npl
    from ffnscope.cache.store import read_state, write_state
    from ffnscope.engine.jobs.launcher import fail_if_own
    from ffnscope.engine.jobs.progress import ProgressFile
    from ffnscope.engine.table.export import export
    from ffnscope.engine.table.table import Table

    replaced, synced, real_replace, real_fsync = [], set(), os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))),
                                                         real_replace(src, dst))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    cache = tmp_path / "c.h5"
    write_state(cache, read_state(good_cache, "testing"), schema.COMPLETE)
    empty = np.zeros((0, 4), np.int32)
    write_npl(tmp_path / "c.h5.npl.h5", NplFile({}, np.zeros(0, np.uint64), np.zeros(0, np.uint64), empty, empty))
    for fmt in ("csv", "parquet"):
        export(Table({"a": [1]}), tmp_path / f"t.{fmt}", fmt)
    ProgressFile(cache, ["ffnscope", "record"]).finish("complete")
    (tmp_path / "d.h5.progress.json").write_text(json.dumps({"pid": os.getpid(), "status": "running"}))
    fail_if_own(tmp_path / "d.h5", "refused")
    monkeypatch.undo()
    outputs = {"c.h5": "c.h5", "c.h5.npl.h5": "c.h5.npl.h5", "t.csv": "t.csv", "t.parquet": "t.parquet",
               "c.h5.progress.json": "c.h5", "d.h5.progress.json": "d.h5"}
    assert {dst.name for _, dst in replaced} == set(outputs)
    assert json.loads((tmp_path / "d.h5.progress.json").read_text())["status"] == "failed"
    monkeypatch.setattr(atomic, "process_alive", lambda pid, command=None: False)  # as if each writer died
    for tmp, dst in replaced:
        assert tmp.parent == dst.parent and str(tmp) in synced, (tmp, dst)
        tmp.write_bytes(b"")
        assert tmp in atomic.stale_temporaries(tmp_path / outputs[dst.name]), (tmp, dst)
        tmp.unlink()


def test_lock_names_only_a_live_holder(tmp_path):
    from ffnscope.cache.errors import UserError
    from ffnscope.cache.lock import lock_path, locked

    path = tmp_path / "c.h5"
    with locked(path, shared=True):  # a reader holds the lock file a killed writer left with its pid
        lock_path(path).write_text(str(_dead_pid()))
        with pytest.raises(UserError, match=r"another ffnscope process is working") as e:
            with locked(path):
                pass
        assert "pid" not in str(e.value)
        lock_path(path).write_text(str(os.getppid()))
        with pytest.raises(UserError, match=rf"another ffnscope process \(pid {os.getppid()}\)"):
            with locked(path):
                pass


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (root only): a disk that fills up."""
    with tmpfs(tmp_path / "fs", "3m") as mount:
        yield mount


def _assert_storage_failure(r, path: Path, before: bytes | None, progress: bool = True):
    """One error line (after any progress lines) naming the path and the space, exit 2, no traceback, the
    previous file byte-identical, no temporary left, the progress file says failed."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr
    assert errors[0].startswith("ffnscope: error: ") and str(path) in errors[0] and "free there" in errors[0]
    if before is not None:
        assert path.read_bytes() == before
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    if progress:
        state = json.loads(path.with_name(path.name + ".progress.json").read_text())
        assert state["status"] == "failed" and "free there" in state["message"]


def test_disk_full_during_a_recording(small_fs, tmp_path, model_dirs, text_file):
    from tests.helpers import assert_same_cache

    out = small_fs / "c.h5"
    args = ("record", "--model", model_dirs["opt"], "--data", text_file, "--out", out, "--tokens", "32768",
            "--seq-len", "32", "--shard-tokens", "4096", "--samples", "6000", "--device", "cpu", "--quiet")
    r = run_cli(*args)
    _assert_storage_failure(r, out, None)
    assert "needed" in r.stderr
    with h5py.File(out, "r") as f:  # the last checkpoint that fitted stands, partial (which shard it names
        assert f.attrs["status"] == "partial"  # depends on the checkpoint cadence, i.e. on timing)
        assert 0 <= f.attrs["shards_done"] < 8
    # nothing recorded up to that checkpoint is lost: with room again, --resume completes it, equal to a
    # recording that never ran out of space
    done = subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    r = run_cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert run_cli(*args[:5], "--out", tmp_path / "whole.h5", *args[7:]).returncode == 0
    assert_same_cache(out, tmp_path / "whole.h5")
    left = [p.name for p in small_fs.iterdir() if p.name not in ("c.h5", "c.h5.progress.json")]
    assert not left  # no segment, no temporary


def test_disk_full_analyze_merge_export(small_fs, tmp_path, model_dirs, text_file, hostile_cache):
    from tests.helpers import record_tiny

    cache = small_fs / "c.h5"
    record_tiny(tmp_path / "c.h5", model_dirs["opt"], [text_file], tokens=8192, samples=2000)
    shutil.copyfile(tmp_path / "c.h5", cache)
    before = cache.read_bytes()
    fill(small_fs, 200_000)
    r = run_cli("analyze", cache)  # needs a copy of the cache: refused before HDF5 writes a byte
    _assert_storage_failure(r, cache, before)
    parts = [tmp_path / "p1.h5", tmp_path / "p2.h5"]
    for i, part in enumerate(parts, 1):
        record_tiny(part, model_dirs["opt"], [text_file], tokens=8192, samples=2000, part=(i, 2))
    r = run_cli("merge", *parts, "--out", small_fs / "m.h5")
    _assert_storage_failure(r, small_fs / "m.h5", None, progress=False)
    assert not (small_fs / "m.h5").exists()
    fill(small_fs, 0, "filler2")
    r = run_cli("export", hostile_cache, "--out", small_fs / "x.csv")
    _assert_storage_failure(r, small_fs / "x.csv", None, progress=False)


def test_write_failure_inside_hdf5_is_one_line(tmp_path, good_cache, monkeypatch):
    """h5py raises RuntimeError (or OSError) from flush on a full disk: one line, old file intact,
    no temporary left."""
    from ffnscope.cache import schema
    from ffnscope.cache.errors import UserError
    from ffnscope.cache.store import read_state, write_state

    path = tmp_path / "c.h5"
    shutil.copyfile(good_cache, path)
    before = path.read_bytes()
    state = read_state(path, "testing")

    def fail(_self):
        raise RuntimeError("Can't flush cache (file write failed: errno = 28, error message = 'No space left')")

    monkeypatch.setattr(h5py.File, "flush", fail)
    with pytest.raises(UserError, match=r"could not write .*c\.h5 \(no space left on the device; .* free there"):
        write_state(path, state, schema.COMPLETE)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_npl_fit(small_fs, tmp_path, model_dirs, text_file):
    from ffnscope.cache.npl_store import sidecar_path
    from tests.helpers import record_tiny

    cache = small_fs / "c.h5"
    record_tiny(tmp_path / "c.h5", model_dirs["opt"], [text_file], tokens=2048, samples=200)
    shutil.copyfile(tmp_path / "c.h5", cache)
    fill(small_fs, 24_000)
    r = run_cli("npl", "fit", cache, "--device", "cpu", "--tokens", "4096", "--quiet", "--pairs", "grid")
    _assert_storage_failure(r, sidecar_path(cache), None)
    assert not sidecar_path(cache).exists()


# --- 5. one writer per file -----------------------------------------------------------------------
def test_one_writer_per_file(tmp_path, good_cache, model_dirs, text_file):
    """While a writer holds a cache (a recording, a resume, an analysis), analyze, record --resume,
    --force, npl fit and merge on it get one line and change nothing; then they run."""
    from ffnscope.cache.lock import lock_path, locked

    cache = tmp_path / "c.h5"
    shutil.copyfile(good_cache, cache)
    before = cache.read_bytes()
    with locked(cache):  # as a running recording holds it
        for args in (["analyze", cache],
                     ["record", "--model", model_dirs["opt"], "--data", text_file, "--out", cache, *SMALL, "--force"],
                     ["record", "--model", model_dirs["opt"], "--data", text_file, "--out", cache, *SMALL, "--resume"],
                     ["npl", "fit", cache, "--device", "cpu", "--quiet"],
                     ["merge", cache, good_cache, "--out", tmp_path / "m.h5"]):
            r = run_cli(*args)
            assert_one_line_error(r, "another ffnscope process", f"pid {os.getpid()}", "c.h5")
        assert cache.read_bytes() == before
        assert not (tmp_path / "m.h5").exists()
    assert not lock_path(cache).exists()  # released: the lock file goes with it
    r = run_cli("analyze", cache, "--only", "dead")
    assert r.returncode == 0, r.stderr
    assert not lock_path(cache).exists()


def test_readers_share_writers_exclude(tmp_path):
    from ffnscope.cache.errors import UserError
    from ffnscope.cache.lock import locked

    path = tmp_path / "c.h5"
    path.write_bytes(b"x")
    code = ("import sys; from ffnscope.cache.lock import locked\n"
            "with locked(sys.argv[1], shared=sys.argv[2] == 's'): print('ok')")
    with locked(path, shared=True):
        env = env_for_subprocess()
        ok = subprocess.run([sys.executable, "-c", code, str(path), "s"], capture_output=True, text=True, env=env)
        assert ok.stdout.strip() == "ok", ok.stderr
        no = subprocess.run([sys.executable, "-c", code, str(path), "x"], capture_output=True, text=True, env=env)
        assert "another ffnscope process" in no.stderr
    with locked(path):
        with pytest.raises(UserError, match="another ffnscope process"):
            with locked(path):  # flock: a second open file description of this process is refused too
                pass


def test_analyses_of_another_recording_are_refused(hostile_cache, tmp_path):
    """Analyses carry the key of the recording they were computed on; a file whose recording changed
    under them (recorded again while an analyze ran) must not show them as its own, and an analyze
    that finds another recording in the file when it writes writes nothing."""
    from ffnscope.cache import analysis_store as store
    from ffnscope.cache.reader import CacheReader
    from ffnscope.cache.errors import UserError

    cache = tmp_path / "c.h5"
    shutil.copy(hostile_cache, cache)
    with CacheReader(cache, "testing") as reader:
        key = store.recording_key(reader)
        assert store.read_group(reader, "dead")  # its own analyses read fine
    with h5py.File(cache, "r+") as f:  # the same file, now holding "another" recording
        meta = json.loads(f.attrs["meta"])
        meta["created"] = "2030-01-01T00:00:00Z"
        f.attrs["meta"] = json.dumps(meta)
    r = run_cli("export", cache, "--out", tmp_path / "x.csv")
    assert_one_line_error(r, "computed on another recording", "ffnscope analyze")
    assert not (tmp_path / "x.csv").exists()
    before = cache.read_bytes()
    with pytest.raises(UserError, match="changed while being analysed"):
        store.write_results(cache, [store.Result("dead", {})], key)  # results of the old recording
    assert cache.read_bytes() == before
