"""Jobs (engine.jobs.launcher) as real processes on tiny models, `record --analyze`, `ffnscope jobs`, and the
recordings catalog (engine.explore.catalog)."""
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

from ffnscope.cache.errors import UserError
from ffnscope.cache.store import read_state
from ffnscope.engine.explore import catalog
from ffnscope.engine.jobs import launcher as jobs
from ffnscope.engine.paths import recordings_dir
from ffnscope.engine.jobs.progress import read_progress
from tests.conftest import ROOT, env_for_subprocess
from tests.helpers import record_tiny

FAST = ["--shard-tokens", "256", "--batch-tokens", "128", "--samples", "40", "--topk", "4"]


@pytest.fixture
def started():
    """Pids of the jobs a test starts; any still running at the end is killed (by pid)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if jobs.process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(out, model_dirs, text_file, started, tokens=1024, extra=(), **options):
    job = jobs.start_record(out, model=str(model_dirs["opt"]), data=[str(text_file)], tokens=tokens,
                            device="cpu", seq_len=64, extra=[*FAST, *extra], env=env_for_subprocess(), **options)
    started.append(job.pid)
    return job


def _poll(output: Path, until, timeout: float = 120.0, dirs=()) -> jobs.Job:
    """Poll list_jobs until `until(job)` holds for the job on `output`; -> that job."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        listed = [j for j in jobs.list_jobs([output.parent, *dirs]) if j.output == output]
        assert len(listed) <= 1
        job = listed[0] if listed else None
        if job is not None and until(job):
            return job
        time.sleep(0.05)
    log = jobs.log_path(output)
    pytest.fail(f"timed out; last job state {job}; log: {log.read_text()[-2000:] if log.exists() else '-'}")


def _done(job):
    return job.status != "running"


def test_record_job_with_analyze(model_dirs, text_file, tmp_path, started):
    out = tmp_path / "rec.h5"
    job = _start(out, model_dirs, text_file, started)
    assert job.kind == "record" and job.status == "running" and job.output == out
    assert job.command[-2:] == ["--quiet", "--analyze"]
    job = _poll(out, _done)
    assert job.status == "complete", job.message
    assert job.phase == "done" and job.tokens_done == job.tokens_total == 1024
    assert job.message and job.started and job.updated >= job.started
    assert read_state(out, "testing").status == "complete"
    log = jobs.log_path(out).read_text()
    for name in ("dead", "ngrams", "positional", "suppression"):
        assert f"analyzing: {name}" in log
    [row] = catalog.scan(dirs=[tmp_path])
    assert row.status == "complete" and row.analyzed and row.error is None, row
    assert set(row.analyses.values()) == {"current"}
    assert (row.model, row.n_tokens, row.seq_len, row.tau, row.n_layers, row.d_ffn) == ("opt", 1024, 64, 0.0, 4, 64)
    assert row.created and row.size_bytes == out.stat().st_size

    # `ffnscope jobs DIR` lists it, without importing torch
    probe = ("import sys; from ffnscope.app.cli import main; code = main(['jobs', sys.argv[1]]); "
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)")
    env = {**env_for_subprocess(), "COLUMNS": "400"}
    shown = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                           env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"in {tmp_path}" in shown.stdout  # grouped by directory, one row per file name
    line = next(ln for ln in shown.stdout.splitlines() if ln.startswith(out.name))
    assert "complete" in line and "1,024/1,024" in line
    assert f"{out.name}: record complete" in shown.stdout
    assert shown.stdout.strip().endswith("NO-TORCH 0"), shown.stdout[-500:]


def test_catalog_and_jobs_do_not_import_torch():
    code = "import engine.explore.catalog, engine.jobs.launcher; import sys; assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for_subprocess(),
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_cancel_stops_and_resume_completes(model_dirs, text_file, tmp_path, started):
    out = tmp_path / "long.h5"
    job = _start(out, model_dirs, text_file, started, tokens=4096, extra=["--shard-tokens", "128"],
                 analyze=False)
    job = _poll(out, lambda j: j.phase in ("recording", "checkpoint") or _done(j))
    assert job.status == "running", f"ended before it could be cancelled: {job}"
    assert jobs.cancel(job)
    job = _poll(out, _done)
    assert job.status == "stopped", job
    assert "--resume" in job.message
    assert not jobs.cancel(job)  # nothing left to signal
    partial = read_state(out, "testing")
    assert partial.status == "partial" and partial.shards_done < partial.meta["recording"]["n_shards"]
    [row] = catalog.scan(dirs=[tmp_path])
    assert row.status == "partial" and not row.analyzed and row.n_tokens == partial.data.tokens.size

    again = jobs.resume(job, env=env_for_subprocess())
    started.append(again.pid)
    assert again.pid != job.pid and again.status == "running"
    assert "--resume" in again.command and "--force" not in again.command
    again = _poll(out, _done)
    assert again.status == "complete", again.message
    final = read_state(out, "testing")
    assert final.status == "complete" and final.shards_done == final.meta["recording"]["n_shards"]
    assert final.data.tokens.size == 4096
    with pytest.raises(UserError, match="complete"):
        jobs.resume(again)


def test_job_outlives_its_parent(model_dirs, text_file, tmp_path, started):
    out = tmp_path / "orphan.h5"
    parent = ("import sys; from pathlib import Path; from engine.jobs.launcher import start_record\n"
              "job = start_record(Path(sys.argv[1]), model=sys.argv[2], data=[sys.argv[3]], tokens=1024, "
              f"device='cpu', seq_len=64, extra={FAST!r}, analyze=False)\n"
              "print(job.pid)")
    done = subprocess.run([sys.executable, "-c", parent, str(out), str(model_dirs["opt"]), str(text_file)],
                          capture_output=True, text=True, env=env_for_subprocess(), timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[-1])
    started.append(pid)
    job = jobs.read_job(out)
    assert job is not None and job.pid == pid and job.status == "running"  # the parent is gone, the job is not
    job = _poll(out, _done)
    assert job.status == "complete", job.message
    assert read_state(out, "testing").status == "complete"


def test_sigkilled_job_is_interrupted(model_dirs, text_file, tmp_path, started):
    out = tmp_path / "killed.h5"
    job = _start(out, model_dirs, text_file, started, tokens=4096, extra=["--shard-tokens", "128"],
                 analyze=False)
    job = _poll(out, lambda j: j.phase in ("recording", "checkpoint") or _done(j))
    assert job.status == "running", job
    os.kill(job.pid, signal.SIGKILL)
    job = _poll(out, _done)
    assert job.status == "interrupted", job
    assert read_progress(out)["status"] == "running"  # the file was left as it was; the listing tells
    assert not jobs.cancel(job)
    assert read_state(out, "testing").status == "partial"


def test_reused_pid_is_not_taken_for_the_job(tmp_path):
    out = tmp_path / "stale.h5"
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        Path(str(out) + ".progress.json").write_text(json.dumps(
            {"pid": stranger.pid, "status": "running", "phase": "recording",
             "command": ["ffnscope", "record", "--out", str(out)]}))
        [job] = jobs.list_jobs([tmp_path])
        assert job.status == "interrupted" and job.pid == stranger.pid
        assert not jobs.cancel(job)
        assert stranger.poll() is None  # not signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_final_status_written_as_the_process_exits_is_not_interrupted(tmp_path, monkeypatch):
    """A job that writes "stopped" and exits between the listing's read of its file and its liveness
    check is stopped, not interrupted (the race a fresh-clone CI once hit)."""
    out = tmp_path / "c.h5"
    path = Path(str(out) + ".progress.json")
    path.write_text(json.dumps({"pid": 4242, "status": "running", "command": []}))

    def exits_after_writing(pid, command=None):
        path.write_text(json.dumps({"pid": 4242, "status": "stopped", "command": []}))
        return False
    monkeypatch.setattr(jobs, "process_alive", exits_after_writing)
    assert jobs.read_job(out).status == "stopped"
    path.write_text(json.dumps({"pid": 4242, "status": "running", "command": []}))
    monkeypatch.setattr(jobs, "process_alive", lambda pid, command=None: False)
    assert jobs.read_job(out).status == "interrupted"  # gone without a word: interrupted


def test_one_liveness_rule_for_jobs(tmp_path):
    """running_job (a second writer refused) and the listing judge a pid alike: a reused pid running
    another program, or a zombie, is not the job."""
    from ffnscope.cache.atomic import process_alive
    from ffnscope.engine.jobs.progress import running_job

    out = tmp_path / "c.h5"
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        for command, alive in ((["ffnscope", "record", "--out", str(out)], False), (["x", "60"], True), ([], True)):
            Path(str(out) + ".progress.json").write_text(json.dumps(
                {"pid": stranger.pid, "status": "running", "command": command}))
            assert running_job(out) == (stranger.pid if alive else None), command
            assert (jobs.read_job(out).status == "running") == alive, command
    finally:
        stranger.kill()
        stranger.wait()
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not process_alive(zombie.pid)
        Path(str(out) + ".progress.json").write_text(json.dumps({"pid": zombie.pid, "status": "running"}))
        assert running_job(out) is None
    finally:
        zombie.wait()


def test_start_refuses_busy_or_existing_output(model_dirs, text_file, tmp_path):
    out = tmp_path / "busy.h5"
    out.write_bytes(b"")
    Path(str(out) + ".progress.json").write_text(json.dumps(
        {"pid": os.getpid(), "status": "running", "command": []}))  # this process: alive
    with pytest.raises(UserError, match="another ffnscope job"):
        jobs.start_record(out, model=str(model_dirs["opt"]), data=[str(text_file)])
    Path(str(out) + ".progress.json").unlink()
    with pytest.raises(UserError, match="exists"):
        jobs.start_record(out, model=str(model_dirs["opt"]), data=[str(text_file)])
    with pytest.raises(UserError, match="does not exist"):
        jobs.start_record(tmp_path / "nowhere" / "x.h5")
    assert not jobs.log_path(out).exists()


def test_job_that_fails_early_says_failed(model_dirs, tmp_path, started):
    out = tmp_path / "bad.h5"
    job = jobs.start_record(out, model=str(model_dirs["opt"]), data=[str(tmp_path / "missing.txt")], tokens=256,
                            device="cpu", seq_len=64, env=env_for_subprocess())
    started.append(job.pid)
    job = _poll(out, _done)
    assert job.status == "failed", job
    assert "missing.txt" in job.message and "\n" not in job.message
    assert not out.exists()


def test_analyze_job(model_dirs, text_file, tmp_path, started):
    out = tmp_path / "c.h5"
    record_tiny(out, model_dirs["opt"], [text_file])
    job = jobs.start_analyze(out, only=["dead", "positional"], env=env_for_subprocess())
    started.append(job.pid)
    assert job.kind == "analyze"
    job = _poll(out, _done)
    assert (job.kind, job.status, job.phase) == ("analyze", "complete", "done"), job
    assert "dead computed" in job.message and "positional computed" in job.message
    row = catalog.summarize(out)
    assert row.analyses == {"dead": "current", "ngrams": "missing", "positional": "current",
                            "suppression": "missing"} and not row.analyzed
    with pytest.raises(UserError, match="complete"):
        jobs.resume(job)


def test_record_analyze_keeps_running_until_analyses_are_stored(model_dirs, text_file, tmp_path, monkeypatch):
    """In process: while the analyses run, the cache is complete and the progress file says running."""
    import ffnscope.engine.analysis.job as run
    from ffnscope.app.cli import main

    seen = {}
    real = run.analyze

    def spy(path, *args, **kwargs):
        seen["progress"] = read_progress(path)
        seen["cache"] = read_state(path, "testing").status
        return real(path, *args, **kwargs)

    monkeypatch.setattr(run, "analyze", spy)
    out = tmp_path / "a.h5"
    argv = ["record", "--model", str(model_dirs["opt"]), "--data", str(text_file), "--tokens", "512",
            "--seq-len", "64", "--device", "cpu", "--out", str(out), *FAST, "--quiet", "--analyze"]
    assert main(argv) == 0
    assert seen["cache"] == "complete"
    assert seen["progress"]["status"] == "running" and seen["progress"]["phase"] == "analyzing"
    assert read_progress(out)["status"] == "complete"
    assert catalog.summarize(out).analyzed

    # a failing analysis: the progress file says failed in one line, the recording stands
    def broken(path, *args, **kwargs):
        raise UserError("no room for the analyses\nsecond line")

    monkeypatch.setattr(run, "analyze", broken)
    out2 = tmp_path / "b.h5"
    assert main([a if a != str(out) else str(out2) for a in argv]) == 2
    progress = read_progress(out2)
    assert progress["status"] == "failed" and "no room for the analyses" in progress["message"]
    assert "\n" not in progress["message"]
    assert read_state(out2, "testing").status == "complete"
    assert catalog.summarize(out2).status == "complete" and not catalog.summarize(out2).analyzed


def test_catalog_error_rows(model_dirs, text_file, tmp_path):
    good = tmp_path / "good.h5"
    record_tiny(good, model_dirs["gpt2"], [text_file])
    truncated = tmp_path / "truncated.h5"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f.attrs["format"] = "someone-else"
    future = tmp_path / "future.h5"
    shutil.copyfile(good, future)
    with h5py.File(future, "a") as f:
        f.attrs["schema_version"] = 99
    (tmp_path / "text.h5").write_text("not hdf5 at all")
    shutil.copyfile(good, tmp_path / ".good.h5.1234.tmp")  # a checkpoint being written: not a recording
    (tmp_path / "notes.txt").write_text("x")

    rows = {r.name: r for r in catalog.scan(files=[tmp_path / "missing.h5", good], dirs=[tmp_path])}
    assert sorted(rows) == ["foreign.h5", "future.h5", "good.h5", "missing.h5", "text.h5", "truncated.h5"]
    assert rows["good.h5"].status == "complete" and rows["good.h5"].error is None
    assert not rows["good.h5"].analyzed and set(rows["good.h5"].analyses.values()) == {"missing"}
    expected = {"truncated.h5": "truncated or foreign", "text.h5": "truncated or foreign",
                "foreign.h5": "not an ffnscope recording", "future.h5": "schema v99",
                "missing.h5": "not found"}
    for name, needle in expected.items():
        row = rows[name]
        assert row.status == "error" and needle in row.error and "\n" not in row.error, row
        assert row.model is None and row.n_tokens is None and not row.analyzed
    assert rows["truncated.h5"].size_bytes == len(data) // 2 and rows["missing.h5"].size_bytes is None


def test_catalog_defaults_to_the_recordings_dir(model_dirs, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FFNSCOPE_CACHE_DIR", str(tmp_path / "uc"))
    assert catalog.scan() == []
    assert recordings_dir() == tmp_path / "uc" / "recordings" and recordings_dir().is_dir()
    record_tiny(recordings_dir() / "r.h5", model_dirs["opt"], [text_file])
    [row] = catalog.scan()
    assert row.name == "r.h5" and row.status == "complete"
    assert [j.output for j in jobs.list_jobs([])] == [recordings_dir() / "r.h5"]


def test_catalog_rereads_a_replaced_cache(hostile_cache, tmp_path):
    """Summaries are remembered by stat; a cache replaced whole (as every writer does) is read again."""
    from ffnscope.cache import analysis_store

    path = tmp_path / "c.h5"
    shutil.copyfile(hostile_cache, path)
    first = catalog.summarize(path)
    assert first.analyzed and catalog.summarize(path) == first
    with h5py.File(path, "a") as f:  # an analysis gone: the file changes size and mtime
        del f[f"{analysis_store.ROOT}/suppression"]
    copy = tmp_path / "copy.h5"
    shutil.copyfile(path, copy)
    os.replace(copy, path)
    again = catalog.summarize(path)
    assert not again.analyzed and again.analyses["suppression"] == "missing"
