"""Every option is validated up front: a bad value gets one line (`ffnscope: error: ...`), exit 2, no
traceback, no file changed, nothing marked complete; `ffnscope jobs` fits 80 columns and forgets ended
jobs; small recordings have several shards, so a stopped one keeps its work."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from ffnscope.app.cli import main
from ffnscope.cache.store import read_state
from ffnscope.engine.jobs import launcher as jobs
from ffnscope.engine.analysis.job import analyze
from ffnscope.engine.record.config import RecordConfig
from ffnscope.engine.record.job import record
from tests.conftest import env_for_subprocess
from tests.helpers import EVERY_SHARD, FAST, record_tiny, start_until_shard

REC = ["record", "--model", "{M}", "--data", "{D}", "--out", "{O}", "--device", "cpu", "--quiet",
       "--tokens", "256", "--seq-len", "32", "--samples", "8"]

# (command line, a piece of the one error line); later options override REC's
BAD = [
    (REC + ["--topk", "-1"], "--topk"),
    (REC + ["--topk", "0"], "--topk"),
    (REC + ["--seq-len", "0"], "--seq-len"),
    (REC + ["--seq-len", "1"], "--seq-len"),
    (REC + ["--tokens", "100000", "--seq-len", "100000"], "above the model's maximum of 64 positions"),
    (REC + ["--shard-tokens", "0"], "--shard-tokens"),
    (REC + ["--shard-tokens", "-256"], "--shard-tokens"),
    (REC + ["--batch-tokens", "0"], "--batch-tokens"),
    (REC + ["--samples", "-5"], "--samples"),
    (REC + ["--ngram-max-freq", "-1"], "--ngram-max-freq"),
    (REC + ["--ngram-max-freq", "1.5"], "--ngram-max-freq"),
    (REC + ["--ngram-max-freq", "nan"], "--ngram-max-freq"),
    (REC + ["--tau", "nan"], "--tau"),
    (REC + ["--tau", "inf"], "--tau"),
    (REC + ["--tokens", "0"], "--tokens"),
    (REC + ["--tokens", "-3"], "--tokens"),
    (REC + ["--tokens", "1e3"], "--tokens"),
    (REC + ["--tokens", "16"], "smaller than one sequence"),
    (REC + ["--calib-tokens", "0"], "--calib-tokens"),
    (REC + ["--seed", "-1"], "--seed"),
    (REC + ["--layers", "99"], "outside 0-3"),
    (REC + ["--layers", "x"], "--layers"),
    (REC + ["--layers", "3-1"], "--layers"),
    (REC + ["--ngram-layers", "7"], "outside 0-3"),
    (REC + ["--layers", "0-1", "--ngram-layers", "3"], "among the recorded --layers"),
    (REC + ["--part", "3/2"], "--part"),
    (REC + ["--part", "0/2"], "--part"),
    (REC + ["--part", "x"], "--part"),
    (REC + ["--part", "automatic"], "--part"),
    (REC + ["--tau-rule", "bogus"], "--tau-rule"),
    (REC + ["--tau-rule", "quantile:1.5"], "--tau-rule"),
    (REC + ["--tau", "0.5", "--tau-rule", "quantile:0.9"], "relative --tau-rule"),
    (REC + ["--dtype", "int8"], "--dtype"),
    (REC + ["--device-memory", "lots"], "--device-memory"),
    (REC + ["--out", "{DIR}", "--force"], "is a directory"),
    (REC + ["--model", "{REMOTE}"], "--trust-remote-code"),
    (["record", "--model", "{M}", "--data", "{D}"], "--out"),
    (["analyze", "{C}", "--set", "foo=1"], "unknown parameter"),
    (["analyze", "{C}", "--set", "ngrams.min_occurrences=0"], "at least 1"),
    (["analyze", "{C}", "--set", "mi_threshold=nan"], "between 0 and 1"),
    (["analyze", "{C}", "--set", "coverage=-0.5"], "between 0 and 1"),
    (["analyze", "{C}", "--set", "coverage=abc"], "not a number"),
    (["analyze", "{C}", "--set", "novalue"], "key=value"),
    (["analyze", "{C}", "--only", "nosuch"], "--only"),
    (["analyze", "{P}"], "partial"),
    (["analyze", "{DIR}/none.h5"], "cache not found"),
    (["export", "{C}", "--positional", "NOSUCHTYPE", "--out", "{O}.csv"], "--positional"),
    (["export", "{C}", "--format", "xls", "--out", "{O}.csv"], "--format"),
    (["export", "{C}", "--where", "nosuch > 1", "--out", "{O}.csv"], "nosuch"),
    (["export", "{C}", "--where", "fire_freq <", "--out", "{O}.csv"], "cannot parse"),
    (["export", "{C}", "--layers", "99", "--out", "{O}.csv"], "outside"),
    (["export", "{C}", "--out", "{DIR}"], "is a directory"),
    (["export", "{C}", "--out", "{DIR}/nodir/x.csv"], "does not exist"),
    (["export", "{C}", "--table", "layers", "--dead", "--out", "{O}.csv"], "--dead"),
    (["export", "{C}", "--table", "bogus", "--out", "{O}.csv"], "--table"),
    (["merge", "{C}", "--out", "{O}"], "at least two"),
    (["merge", "{C}", "{P}", "--out", "{O}"], "partial"),
    (["merge", "{C}", "{C}", "--out", "{DIR}", "--force"], "is a directory"),
    (["npl", "fit", "{P}", "--device", "cpu"], "partial"),
    (["npl", "fit", "{C}", "--tokens", "0"], "--tokens"),
    (["npl", "fit", "{C}", "--holdout", "1.5"], "--holdout"),
    (["npl", "fit", "{C}", "--ridge", "-1"], "--ridge"),
    (["npl", "fit", "{C}", "--ridge", "nan"], "--ridge"),
    (["npl", "fit", "{C}", "--pairs", "0:99", "--device", "cpu"], "--pairs"),
    (["npl", "fit", "{C}", "--batch-tokens", "0"], "--batch-tokens"),
    (["npl", "fit", "{C}", "--method", "bogus"], "--method"),
    (["npl", "substitute", "{C}", "--seeds", "0"], "--seeds"),
    (["npl", "functional", "{C}", "--tokens", "-1"], "--tokens"),
    (["npl", "substitute", "{P}", "--device", "cpu"], "partial"),
    (["tui", "--tokens", "0"], "--tokens"),
    (["tui", "--tokens", "nan"], "--tokens"),
    (["tui", "{DIR}/none.h5"], "no such file"),
    (["jobs", "/nonexistent-ffnscope-dir"], "not a directory"),
    (["jobs", "--dismiss", "{O}"], "no job"),
    (["report", "{C}", "--position-plots", "-1"], "--position-plots"),
]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, model_dirs, text_file):
    """A complete cache, a partial one, and a model directory whose config asks for its own code."""
    base = tmp_path_factory.mktemp("validation")
    complete = base / "good.h5"
    record_tiny(complete, model_dirs["opt"], [text_file])
    analyze(complete, log=lambda _m: None)
    partial = base / "partial.h5"
    shutil.copyfile(complete, partial)
    with h5py.File(partial, "a") as f:
        f.attrs["status"] = "partial"
    remote = base / "remote-model"
    shutil.copytree(model_dirs["opt"], remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="ffnscope-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                          "AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (remote / "config.json").write_text(json.dumps(config))
    return complete, partial, remote


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def _main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_every_bad_value_gets_one_line_and_changes_nothing(tmp_path, capsys, caches, model_dirs, text_file):
    """The table: at least 40 bad values over record, analyze, export, merge, npl, tui, jobs, report."""
    assert len(BAD) >= 40
    complete, partial, remote = caches
    work = tmp_path / "work"
    (work / "adir").mkdir(parents=True)
    shutil.copyfile(complete, work / "good.h5")
    shutil.copyfile(partial, work / "partial.h5")
    names = {"M": model_dirs["opt"], "D": text_file, "O": work / "out.h5", "DIR": work / "adir",
             "C": work / "good.h5", "P": work / "partial.h5", "REMOTE": remote}
    before = _snapshot(work)
    failures = []
    for template, needle in BAD:
        argv = [part.format(**{k: str(v) for k, v in names.items()}) for part in template]
        code, err = _main(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if len(lines) != 1 or not lines[0].startswith("ffnscope: error: "):
            problems.append(f"not one error line: {err[-600:]!r}")
        elif needle not in lines[0]:
            problems.append(f"{needle!r} not in {lines[0]!r}")
        after = _snapshot(work)
        if after != before:
            problems.append(f"files changed: {set(after.items()) ^ set(before.items())}")
            for name in set(after) - set(before):  # so the next case starts clean
                path = work / name
                path.unlink() if path.is_file() else None
        if problems:
            failures.append(f"{' '.join(argv)}: {'; '.join(problems)}")
    assert read_state(work / "partial.h5", "testing").status == "partial"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("args, needle", [
    (["record", "--model", "{M}", "--data", "{D}", "--out", "{O}", "--topk", "-1"], "--topk"),
    (["export", "{C}", "--positional", "NOSUCHTYPE", "--out", "{O}"], "--positional"),
    (["jobs", "/nonexistent-ffnscope-dir"], "not a directory"),
])
def test_real_command_line_prints_one_line(tmp_path, caches, model_dirs, text_file, args, needle):
    names = {"M": model_dirs["opt"], "D": text_file, "O": tmp_path / "out.h5", "C": caches[0]}
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in args]
    r = subprocess.run([sys.executable, "-m", "ffnscope", *argv], capture_output=True, text=True,
                       env=env_for_subprocess(), timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("ffnscope: error: ") and needle in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                 "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")


@pytest.mark.parametrize("env, out, needle", [
    ({}, "out.h5", "needs torchrun's RANK and WORLD_SIZE or a Slurm array's SLURM_ARRAY_TASK_ID"),
    ({"RANK": "0"}, "out.part{part}.h5", "WORLD_SIZE is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "out.h5", "put {part} in --out, like --out"),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, "out.h5",
     "put {part} in --out"),
    ({"SLURM_ARRAY_TASK_ID": "2"}, "out.part{part}.h5", "SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT"),
])
def test_part_auto_refusals(tmp_path, capsys, monkeypatch, model_dirs, text_file, env, out, needle):
    """--part auto outside a launcher, or with one --out for several processes: one line, nothing written."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [str(tmp_path / out) if a == "{O}" else a.format(M=model_dirs["opt"], D=text_file) for a in REC]
    code, err = _main(argv + ["--part", "auto"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ffnscope: error: ") and needle in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_tokens_above_the_data_says_so(tmp_path, model_dirs, text_file):
    notes: list[str] = []
    state = record(RecordConfig(out=tmp_path / "a.h5", model=str(model_dirs["opt"]), data=[str(text_file)],
                                tokens=10_000_000, **FAST), log=notes.append)
    [note] = [n for n in notes if "asked" in n]
    assert note.startswith("note: --tokens 10,000,000 asked, but the data holds only ")
    assert f"{state.n_tokens:,} tokens" in note
    notes.clear()
    state = record(RecordConfig(out=tmp_path / "b.h5", model=str(model_dirs["opt"]), data=[str(text_file)],
                                tokens=1000, **FAST), log=notes.append)
    assert state.n_tokens == 992
    assert "note: recording 992 tokens: --tokens 1,000 rounded down to whole sequences of 32" in notes


def test_small_recordings_have_several_shards(tmp_path, model_dirs, text_file):
    state = record_tiny(tmp_path / "c.h5", model_dirs["opt"], [text_file], tokens=768, shard_tokens=None)
    rec = state.meta["recording"]
    assert rec["n_shards"] == 4 and rec["shard_tokens"] == 192
    big = record_tiny(tmp_path / "d.h5", model_dirs["opt"], [text_file], tokens=4096, shard_tokens=None)
    assert big.meta["recording"]["n_shards"] == 4 and big.meta["recording"]["shard_tokens"] == 1024


def test_stopped_small_recording_keeps_its_checkpoint(tmp_path, model_dirs, text_file):
    """No --shard-tokens: the default cuts a small recording into 4 shards, so a stop after the first
    keeps work (with a checkpoint after every shard: the cadence would make it timing), the stop message
    and the TUI's cancel message say how much, and --resume finishes it."""
    out = tmp_path / "small.h5"
    cmd = [sys.executable, "-c", EVERY_SHARD, "record", "--model", str(model_dirs["llama"]),
           "--data", str(text_file), "--out", str(out), "--tokens", "32768", "--seq-len", "32",
           "--batch-tokens", "64", "--samples", "40", "--topk", "4", "--device", "cpu", "--quiet"]
    proc = start_until_shard(cmd, out, 2, timeout=180)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    partial = read_state(out, "testing")
    assert partial.status == "partial" and 1 <= partial.shards_done < 4 == partial.meta["recording"]["n_shards"]
    assert f"({partial.shards_done} of 4 shards)" in stderr
    assert f"it keeps {partial.shards_done} of 4 shards" in jobs.kept_work(jobs.read_job(out))
    done = subprocess.run(cmd + ["--resume"], env=env_for_subprocess(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_state(out, "testing").status == "complete"


def _progress_file(directory: Path, name: str, **fields) -> None:
    now = time.time()
    base = {"started": now - 60, "updated": now, "command": [], "pid": 2**22 + 7, "status": "complete"}
    (directory / f"{name}.progress.json").write_text(json.dumps({**base, **fields}))


def test_jobs_fit_80_columns(tmp_path):
    long = "smollm2-default-recording-with-a-rather-long-name-of-the-day.h5"
    _progress_file(tmp_path, long, status="running", pid=os.getpid(), phase="recording", shard=2, n_shards=5,
                   tokens_done=16384, tokens_total=1638400, tokens_per_s=12345.6, eta_s=4000.0)
    _progress_file(tmp_path, long + ".npl.h5", status="failed", phase="loading model", message="boom",
                   command=["ffnscope", "npl", "fit"])
    _progress_file(tmp_path, "short.h5", tokens_done=16384, tokens_total=16384, message="16384 tokens recorded",
                   command=["ffnscope", "record"])
    env = {**env_for_subprocess(), "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "ffnscope", "jobs", str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), r.stdout
    rows = {line.split()[0]: line for line in lines
            if line.startswith(("smollm2", "short")) and not line.split()[0].endswith(":")}  # not the notes
    assert len(rows) == 3, r.stdout  # the two long names stay distinguishable once elided
    [running] = [line for name, line in rows.items() if "recording shard 2/5" in line]
    assert "16,384/1,638,400" in running and "12,346" in running and str(os.getpid()) in running
    assert "16,384/16,384" in rows["short.h5"]
    # an ended job's note is one line: its name cut in the middle to fit, the message whole
    [note] = [line for line in lines if line.endswith(".npl.h5: npl failed during loading model: boom")]
    assert note.startswith("smollm2-") and "…" in note


def test_jobs_dismiss_and_clean(tmp_path):
    _progress_file(tmp_path, "done.h5")
    _progress_file(tmp_path, "failed.h5", status="failed", message="bad")
    _progress_file(tmp_path, "stopped.h5", status="stopped", message="stopped by signal")
    _progress_file(tmp_path, "running.h5", status="running", pid=os.getpid())
    (tmp_path / "failed.h5.log").write_text("why it failed")
    assert main(["jobs", "--dismiss", str(tmp_path / "failed.h5")]) == 0
    assert not (tmp_path / "failed.h5.progress.json").exists() and (tmp_path / "failed.h5.log").exists()
    assert main(["jobs", "--dismiss", str(tmp_path / "running.h5")]) == 2  # running: cancel it first
    assert main(["jobs", "--clean", str(tmp_path)]) == 0
    left = sorted(p.name for p in tmp_path.glob("*.progress.json"))
    assert left == ["running.h5.progress.json", "stopped.h5.progress.json"]  # stopped ones can be resumed
    assert main(["jobs", "--dismiss", str(tmp_path / "stopped.h5.progress.json")]) == 0
    assert [j.output.name for j in jobs.list_jobs([tmp_path])] == ["running.h5"]


async def test_recordings_screen_dismisses_a_failed_job(tmp_path, hostile_cache):
    from ffnscope.app.tui.app import FFNScopeApp
    from ffnscope.app.tui.recordings import RecordingsScreen
    from tests.tui_helpers import wait_for, wait_screen

    shutil.copyfile(hostile_cache, tmp_path / "c.h5")
    _progress_file(tmp_path, "c.h5", status="failed", message="analysis failed", command=["ffnscope", "analyze"])
    app = FFNScopeApp([], dirs=[tmp_path])
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await wait_screen(pilot, RecordingsScreen)
        await wait_for(pilot, lambda: len(screen.rows) == 1 and screen.rows[0].job is not None, what="the row")
        assert screen.rows[0].status() == "failed"
        await pilot.press("d")
        await wait_for(pilot, lambda: screen.rows and screen.rows[0].job is None, what="the job dismissed")
        assert screen.rows[0].status() == "complete"
    assert not (tmp_path / "c.h5.progress.json").exists() and (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("options, needle", [("--topk 0", "--topk"), ("--tau nan", "--tau"),
                                             ("--bogus 3", "unrecognized"), ("--help", "--help")])
def test_record_form_refuses_bad_options_in_place(options, needle):
    """The TUI form's "more options" are checked as the job would check them, before it starts."""
    from ffnscope.app.tui.record_form import FIELDS, check
    from ffnscope.cache.errors import UserError

    values = {key: default for key, _label, default, _hint in FIELDS}
    values.update(name="x", options=options)
    with pytest.raises(UserError, match="more options") as info:
        check(values)
    assert needle in str(info.value)
    values["options"] = "--tau 0.5 --seq-len 64"
    assert check(values)["extra"] == ["--tau", "0.5", "--seq-len", "64"]
