"""Shared directories are hostile (issue 19): what someone else plants where ffnscope keeps its side files
(segments, locks, temporaries, spills, progress) costs nobody anything, `export` never overwrites a file
it was not told to (nor a recording, ever), and a file name never reaches the terminal raw."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pyte
import pytest

import ffnscope.engine.record.executor as executor
from ffnscope.app.cli import main
from ffnscope.engine.analysis.job import analyze
from ffnscope.engine.safe_text import printable
from tests.helpers import record_tiny
from tests.test_tui_terminal import COLS, ROWS, installed_command
from tests.conftest import env_for_subprocess

CLI_FAST = ["--seq-len", "32", "--shard-tokens", "256", "--batch-tokens", "64", "--samples", "40", "--topk", "4",
            "--device", "cpu", "--calib-tokens", "128", "--quiet"]
RANDOM = "0a1b2c3d"  # the random part of a temporary's name


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def made(tmp_path_factory, model_dirs, text_file):
    """Recordings the commands work on: complete (c.h5), analyzed (a.h5), two parts, and a partial one whose
    recording was stopped after two of its three shards (with its segments)."""
    base = tmp_path_factory.mktemp("hostile-dirs")
    model = model_dirs["opt"]
    record_tiny(base / "c.h5", model, [text_file])
    shutil.copyfile(base / "c.h5", base / "a.h5")
    analyze(base / "a.h5", log=lambda _m: None)
    for i in (1, 2):
        record_tiny(base / f"p{i}.h5", model, [text_file], part=(i, 2))
    (base / "partial").mkdir()
    real, calls = executor.write_segment, [0]

    def stopping(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    executor.write_segment, ratio = stopping, executor.Recorder.CHECKPOINT_RATIO
    executor.Recorder.CHECKPOINT_RATIO = 0.0  # a checkpoint after every shard
    try:
        with pytest.raises(KeyboardInterrupt):
            record_tiny(base / "partial" / "c.h5", model, [text_file])
    finally:
        executor.write_segment, executor.Recorder.CHECKPOINT_RATIO = real, ratio
    (base / "partial" / "c.h5.progress.json").unlink()
    assert (base / "partial" / ".c.h5.segments").is_dir()
    return SimpleNamespace(base=base, model=model, text=text_file, dead=_dead_pid())


# --- the commands: (setup(work, made) -> argv, the names whose side files are planted) -----------------
def _copy(made, name, work, as_name=None):
    shutil.copyfile(made.base / name, work / (as_name or name))


def _record(work, made):
    return ["record", "--model", made.model, "--data", made.text, "--out", work / "c.h5", "--tokens", "768",
            *CLI_FAST], ["c.h5"]


def _resume(work, made):
    shutil.copyfile(made.base / "partial" / "c.h5", work / "c.h5")
    shutil.copytree(made.base / "partial" / ".c.h5.segments", work / ".c.h5.segments")
    return [*_record(work, made)[0], "--resume"], ["c.h5"]


def _analyze(work, made):
    _copy(made, "c.h5", work)
    return ["analyze", work / "c.h5", "--only", "dead"], ["c.h5"]


def _merge(work, made):
    _copy(made, "p1.h5", work)
    _copy(made, "p2.h5", work)
    return ["merge", work / "p1.h5", work / "p2.h5", "--out", work / "m.h5"], ["m.h5", "p1.h5"]


def _npl_fit(work, made):
    _copy(made, "c.h5", work)
    # the sidecar's side files (the cache's own are planted for the other commands)
    return ["npl", "fit", work / "c.h5", "--tokens", "1024", "--device", "cpu", "--quiet"], ["c.h5.npl.h5"]


def _export(work, made):
    _copy(made, "a.h5", work)
    return ["export", work / "a.h5", "--out", work / "x.csv"], ["a.h5", "x.csv"]


def _info(work, made):
    _copy(made, "c.h5", work)
    return ["info", work / "c.h5"], ["c.h5"]


COMMANDS = {"record": _record, "record --resume": _resume, "analyze": _analyze, "merge": _merge,
            "npl fit": _npl_fit, "export": _export, "info": _info}


# --- the plants: plant(work, name, victim, dead) -> (paths planted, paths that must stay as they are) -------
def _victim(directory: Path) -> Path:
    """A user's directory: files, one named like a segment and one like merge scratch, a subdirectory."""
    (directory / "sub").mkdir(parents=True)
    for name, data in {"precious.txt": b"precious\n", "000000.h5": b"not ours", "merge.gram.raw": b"mine",
                       "sub/inner.txt": b"inner\n"}.items():
        (directory / name).write_bytes(data)
    return directory


def _segments_symlink(work, name, victim, dead):
    link = work / f".{name}.segments"
    if link.is_dir():
        shutil.rmtree(link)  # a partial recording's own: replaced by the plant
    link.symlink_to(victim, target_is_directory=True)
    return [link], [link]


def _segments_dir(work, name, victim, dead):
    """A real directory there (another's, or ours with another's files in it): what is not ours stays."""
    folder = work / f".{name}.segments"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_bytes(b"notes\n")
    (folder / "sub" / "inner.txt").write_bytes(b"inner\n")
    os.link(victim / "precious.txt", folder / "000009.h5")  # segment-named, but a hard link of another's file
    os.link(victim / "precious.txt", folder / f".000009.h5.{dead}.{RANDOM}.tmp")
    (folder / "000010.h5").symlink_to(victim / "precious.txt")
    return [folder], [folder / name for name in _segments_planted(dead)]


def _segments_planted(dead: int) -> list[str]:
    return ["notes.txt", "sub", "000009.h5", f".000009.h5.{dead}.{RANDOM}.tmp", "000010.h5"]


def _lock_symlink(work, name, victim, dead):
    link = work / f".{name}.lock"
    link.symlink_to(victim / "precious.txt")
    return [link], [link]


def _lock_hardlink(work, name, victim, dead):
    link = work / f".{name}.lock"
    os.link(victim / "precious.txt", link)
    return [link], [link]


def _temporaries(work, name, victim, dead):
    """Names of a dead writer's temporaries and spills: as symlinks, hard links and directories."""
    planted = []
    for i, suffix in enumerate(("tmp", "hidden")):
        link = work / f".{name}.{dead}.1111111{i}.{suffix}"
        link.symlink_to(victim / "precious.txt")
        hard = work / f".{name}.{dead}.2222222{i}.{suffix}"
        os.link(victim / "precious.txt", hard)
        folder = work / f".{name}.{dead}.3333333{i}.{suffix}"
        folder.mkdir()
        (folder / "inner.txt").write_bytes(b"inner\n")
        planted += [link, hard, folder]
    progress = work / f".{name}.progress.json.{dead}.{RANDOM}.tmp"
    progress.symlink_to(victim / "sub" / "inner.txt")
    planted.append(progress)
    return planted, planted


def _progress_symlink(work, name, victim, dead):
    link = work / f"{name}.progress.json"
    link.symlink_to(victim / "precious.txt")
    return [link], []  # a progress file is replaced whole (renamed over): the link goes, its target stays


def _progress_hardlink(work, name, victim, dead):
    link = work / f"{name}.progress.json"
    os.link(victim / "precious.txt", link)
    return [link], []


PLANTS = {"nothing": lambda *_: ([], []), "segments symlink": _segments_symlink, "segments dir": _segments_dir,
          "lock symlink": _lock_symlink, "lock hard link": _lock_hardlink, "temporaries": _temporaries,
          "progress symlink": _progress_symlink, "progress hard link": _progress_hardlink}


def _snapshot(paths: list[Path]) -> dict:
    """What each path is, without following a link: a link's target, a file's bytes, a directory's entries."""
    out = {}
    for path in paths:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            out[path] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[path] = ("dir", sorted(os.listdir(path)))
            out.update(_snapshot([path / n for n in os.listdir(path)]))
        else:
            out[path] = ("file", path.read_bytes())
    return out


def _watched(paths: list[Path]) -> dict:
    try:
        return _snapshot(paths)
    except FileNotFoundError as exc:
        return {"missing": exc.filename}


@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_planted_side_file_costs_nobody_anything(command, plant, made, tmp_path, capsys):
    """Every command beside every plant: the victim's files stay, byte for byte, and the command either
    does its work or refuses in one line naming what it found there."""
    work = tmp_path / "work"
    work.mkdir()
    victim = _victim(tmp_path / "victim")
    argv, names = COMMANDS[command](work, made)
    planted, kept = [], []
    for name in names:
        p, k = PLANTS[plant](work, name, victim, made.dead)
        planted += p
        kept += k
    before = _watched([victim, *kept])
    capsys.readouterr()
    code = main([str(a) for a in argv])  # a traceback fails the test
    err = capsys.readouterr().err
    assert _watched([victim, *kept]) == before, err
    lines = [line for line in err.splitlines() if line.strip()]
    if plant == "nothing":
        assert code == 0, err
    else:
        assert code in (0, 2), err
    if plant == "segments dir" and code == 0:  # what the command wrote there went; what it did not stays
        assert all(sorted(os.listdir(folder)) == sorted(_segments_planted(made.dead)) for folder in planted), err
    if code == 2:
        assert lines and lines[-1].startswith("ffnscope: error: ") and len([
            line for line in lines if "error" in line]) == 1, err
        assert any(printable(p.name) in lines[-1] for p in planted), err  # it names what it refused


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_a_planted_job_log_is_refused(made, tmp_path, kind):
    """A job started from the app appends to `NAME.log`: never to the file a planted link names."""
    from ffnscope.cache.errors import UserError
    from ffnscope.engine.jobs import launcher

    victim = _victim(tmp_path / "victim")
    cache = tmp_path / "c.h5"
    shutil.copyfile(made.base / "c.h5", cache)
    log = launcher.log_path(cache)
    log.symlink_to(victim / "precious.txt") if kind == "symlink" else os.link(victim / "precious.txt", log)
    before = _watched([victim, log])
    with pytest.raises(UserError, match="job log"):
        launcher.start_analyze(cache)
    assert _watched([victim, log]) == before and not launcher.progress_path(cache).exists()


# --- export never overwrites what it was not told to ------------------------------------------------
def _run(*args):
    return subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], capture_output=True, text=True,
                          env=env_for_subprocess(), timeout=300)


def _one_line_error(result, *needles):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("ffnscope: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_export_replaces_an_existing_file_only_with_force(made, tmp_path):
    cache, out = made.base / "a.h5", tmp_path / "x.csv"
    out.write_bytes(b"someone's table\n")
    _one_line_error(_run("export", cache, "--out", out), str(out), "--force")
    assert out.read_bytes() == b"someone's table\n"
    done = _run("export", cache, "--out", out, "--force")
    assert done.returncode == 0, done.stderr
    assert out.read_text().startswith("layer,neuron,")


def test_export_never_writes_over_a_recording(made, tmp_path):
    """Not the input (by its name, a symlink or a hard link to it), not another recording, even with --force."""
    cache = tmp_path / "a.h5"
    shutil.copyfile(made.base / "a.h5", cache)
    other = tmp_path / "other.h5"
    shutil.copyfile(made.base / "c.h5", other)
    (tmp_path / "link.h5").symlink_to(cache)
    os.link(cache, tmp_path / "hard.h5")
    recordings = {p: p.read_bytes() for p in (cache, other)}
    for out in (cache, tmp_path / "link.h5", tmp_path / "hard.h5", other):
        for force in ([], ["--force"]):
            _one_line_error(_run("export", cache, "--out", out, *force), str(out))
    assert {p: p.read_bytes() for p in recordings} == recordings
    assert (tmp_path / "link.h5").is_symlink() and os.stat(tmp_path / "hard.h5").st_ino == os.stat(cache).st_ino


def test_merge_never_writes_over_an_input(made, tmp_path):
    parts = []
    for name in ("p1.h5", "p2.h5"):
        shutil.copyfile(made.base / name, tmp_path / name)
        parts.append(tmp_path / name)
    os.link(parts[0], tmp_path / "hard.h5")
    (tmp_path / "link.h5").symlink_to(parts[1])
    before = {p: p.read_bytes() for p in parts}
    for out in (parts[0], tmp_path / "hard.h5", tmp_path / "link.h5"):
        _one_line_error(_run("merge", *parts, "--out", out, "--force"), str(out))
    assert {p: p.read_bytes() for p in parts} == before
    assert os.stat(tmp_path / "hard.h5").st_ino == os.stat(parts[0]).st_ino


async def test_export_dialog_asks_before_replacing_and_refuses_a_recording(made, tmp_path):
    from ffnscope.app.tui.app import FFNScopeApp
    from ffnscope.app.tui.layers import LayersScreen
    from ffnscope.app.tui.modals import ExportScreen
    from tests.tui_helpers import settle, wait_screen

    cache = tmp_path / "a.h5"
    shutil.copyfile(made.base / "a.h5", cache)
    taken = tmp_path / "taken.csv"
    taken.write_bytes(b"someone's table\n")
    app = FFNScopeApp([cache], dirs=[], export_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_screen(pilot, LayersScreen)
        for path in (cache, taken):
            await pilot.press("e")
            dialog = await wait_screen(pilot, ExportScreen)
            await pilot.press("enter")  # CSV; focus to the path
            dialog.query_one("#path").value = str(path)
            await pilot.press("enter")
            await settle(pilot)
            assert app.screen is dialog and str(path) in str(dialog.query_one(".error").render())
            await pilot.press("enter")  # again: replaces a table, never a recording
            await settle(pilot)
            assert (app.screen is dialog) == (path == cache)
            if app.screen is dialog:
                await pilot.press("escape")
                await settle(pilot)
    assert cache.read_bytes() == (made.base / "a.h5").read_bytes()
    assert taken.read_text().startswith("layer,")


# --- a file name never reaches the terminal raw -----------------------------------------------------
# each planted sequence with a neighbour of its own, so the app's own escapes are never taken for it
HOSTILE_NAME = "t\x1b]0;PWNED\x07\x1b[2J\u202eRTL\rZAP\x1b[7mREV.h5"
RAW = [b"\x1b]0;PWNED", b"PWNED\x07", b"\x07\x1b[2J", b"\x1b[2J\xe2\x80\xae", b"\xe2\x80\xaeRTL", b"RTL\rZAP",
       b"ZAP\x1b[7m", b"\x1b[7mREV"]


def test_a_hostile_file_name_never_reaches_the_terminal_raw(made):
    """The app in a real pseudo-terminal on a recording so named: the layers screen's breadcrumb and the export
    dialog's default path show the name escaped; not one planted sequence is written raw."""
    folder = Path(tempfile.mkdtemp(prefix="ffh", dir="/tmp"))  # short: the dialog's input shows the path's start
    cache = folder / HOSTILE_NAME
    shutil.copyfile(made.base / "a.h5", cache)
    env = env_for_subprocess()
    env.update(TERM="xterm-256color", COLUMNS=str(COLS), LINES=str(ROWS))
    child = pexpect.spawn(installed_command(), ["tui", str(cache)], env=env, cwd=str(folder), dimensions=(ROWS, COLS))
    screen = pyte.Screen(COLS, ROWS)
    stream, written = pyte.ByteStream(screen), bytearray()
    escaped = printable(HOSTILE_NAME)[:30]

    def wait_for(shown, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while not shown(screen.display):
            assert time.monotonic() < deadline and child.isalive(), "\n".join(screen.display)
            try:
                data = child.read_nonblocking(65536, timeout=0.1)
            except pexpect.TIMEOUT:
                continue
            written.extend(data)
            stream.feed(data)
        return screen.display

    try:
        lines = wait_for(lambda lines: any("alive freq" in line for line in lines))  # the layers screen
        assert any(f"Recordings > {escaped}" in line for line in lines), "\n".join(lines)
        child.send("e")
        wait_for(lambda lines: any(line.startswith("to file") and escaped in below
                                   for line, below in zip(lines, lines[2:])))  # the default path, in its box
        child.send("\x1b")
        time.sleep(0.3)
        child.send("q")
        child.expect(pexpect.EOF, timeout=30)
        written.extend(child.before or b"")
    finally:
        if child.isalive():
            child.terminate(force=True)
        shutil.rmtree(folder)
    child.close()
    assert not [sequence for sequence in RAW if sequence in written]
