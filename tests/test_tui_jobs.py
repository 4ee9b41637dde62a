"""Recordings started from the TUI as real job processes: the form, live progress, cancel, resume,
the screens filling in when the job is done, quitting while a job runs, and the quick start."""
from __future__ import annotations

import os
import signal

import pytest

from ffnscope.app.tui.app import FFNScopeApp
from ffnscope.app.tui.layers import LayersScreen
from ffnscope.app.tui.modals import ConfirmScreen
from ffnscope.app.tui.record_form import RecordFormScreen
from ffnscope.app.tui.recordings import RecordingsScreen
from ffnscope.engine.jobs import launcher as jobs
from ffnscope.engine.paths import recordings_dir
from tests.tui_helpers import screen_text, settle, wait_for, wait_screen

SIZE = (80, 24)
FAST = "--seq-len 64 --shard-tokens 256 --batch-tokens 128 --samples 40 --topk 4 --device cpu"


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """A private recordings directory; jobs still running at the end are killed."""
    monkeypatch.setenv("FFNSCOPE_CACHE_DIR", str(tmp_path / "uc"))
    yield recordings_dir()
    for job in jobs.list_jobs():
        if job.status == jobs.RUNNING and job.pid:
            try:
                os.kill(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def row_of(screen: RecordingsScreen, name: str):
    return next((r for r in screen.rows if r.path.name == name), None)


async def fill_form(pilot, values: dict[str, str]) -> None:
    form = await wait_screen(pilot, RecordFormScreen)
    for key, value in values.items():
        form.query_one(f"#{key}").value = value
    await pilot.press("ctrl+s")


async def test_form_progress_cancel_resume_fill(user_cache, model_dirs, text_file):
    app = FFNScopeApp(dirs=None)
    async with app.run_test(size=SIZE) as pilot:
        screen = await wait_screen(pilot, RecordingsScreen)
        assert "no recordings yet" in screen_text(app)
        await pilot.press("n")
        await fill_form(pilot, {"name": "flow", "model": str(model_dirs["opt"]), "data": str(text_file),
                                "tokens": "30000", "options": FAST})
        screen = await wait_screen(pilot, RecordingsScreen)
        out = user_cache / "flow.h5"
        assert out in app.started_jobs
        # live progress: the row shows a percentage, a rate and an ETA while the job records
        await wait_for(pilot, lambda: (row := row_of(screen, "flow.h5")) is not None and row.job is not None
                       and (row.job.tokens_done or 0) > 0 and row.job.status == jobs.RUNNING, 90, "recording progress")
        assert "%" in row_of(screen, "flow.h5").status() and "tok/s" in screen_text(app)
        screen.query_one("VirtualTable").cursor = screen.rows.index(row_of(screen, "flow.h5"))
        await pilot.press("x")
        await wait_for(pilot, lambda: row_of(screen, "flow.h5").job.status == jobs.STOPPED, 60, "the job to stop")
        assert row_of(screen, "flow.h5").summary.status == "partial"
        assert "stopped" in screen_text(app)
        await pilot.press("r")
        await wait_for(pilot, lambda: (row := row_of(screen, "flow.h5")).job.status == jobs.COMPLETE
                       and row.summary is not None and row.summary.analyzed, 180, "resume, record and analyze")
        assert row_of(screen, "flow.h5").status() == "complete"
        log = jobs.log_path(out).read_text()
        assert "--resume" in log  # the second run continued from the checkpoint
        await pilot.press("enter")
        layers = await wait_screen(pilot, LayersScreen)
        assert len(layers.figures["layer"]) == 4 and layers.rec.analyzed
        assert "not analyzed" not in screen_text(app)


async def test_form_refuses_bad_values_in_place(user_cache):
    app = FFNScopeApp(dirs=None)
    async with app.run_test(size=SIZE) as pilot:
        await wait_screen(pilot, RecordingsScreen)
        await pilot.press("n")
        await fill_form(pilot, {"name": "x", "tokens": "many"})
        await pilot.pause()
        assert isinstance(app.screen, RecordFormScreen) and "tokens: write a whole number" in screen_text(app)
        await fill_form(pilot, {"tokens": "100", "data": "/no/such/file.txt"})
        await pilot.pause()
        assert "does not exist" in screen_text(app)
        await fill_form(pilot, {"data": "builtin", "host_memory": "lots"})
        await pilot.pause()
        assert "is not a size" in screen_text(app)
        assert not app.started_jobs and not list(user_cache.iterdir())


async def test_quit_asks_while_a_job_started_here_runs(user_cache, model_dirs, text_file):
    """The job is frozen (SIGSTOP) once it runs, so whether it is still running when the app quits and
    when it is cancelled does not depend on how fast this machine records."""
    app = FFNScopeApp(dirs=None)
    async with app.run_test(size=SIZE) as pilot:
        await wait_screen(pilot, RecordingsScreen)
        job = jobs.start_record(user_cache / "long.h5", model=str(model_dirs["opt"]), data=[str(text_file)],
                                tokens=30000, extra=FAST.split())
        await wait_for(pilot, lambda: jobs.read_job(job.output).phase not in ("", "starting"), 120,
                       "the job's own progress file")
        os.kill(job.pid, signal.SIGSTOP)
        assert jobs.read_job(job.output).status == jobs.RUNNING
        app.started_jobs.add(job.output)
        await pilot.press("q")
        await wait_screen(pilot, ConfirmScreen)
        assert "still running" in screen_text(app) and "keep running" in screen_text(app)
        await pilot.press("n")
        await wait_screen(pilot, RecordingsScreen)
        await pilot.press("ctrl+q")
        await wait_screen(pilot, ConfirmScreen)
        await pilot.press("y")
        await settle(pilot)
    assert app.return_code == 0
    assert jobs.read_job(job.output).status == jobs.RUNNING  # the job outlives the app
    assert jobs.process_alive(job.pid)
    assert jobs.cancel(jobs.read_job(job.output))
    os.kill(job.pid, signal.SIGCONT)  # the SIGINT is delivered now
    assert jobs.wait(job, timeout=60).status == jobs.STOPPED


async def test_quick_start_records_then_opens_layers(user_cache, model_dirs):
    """The main job: no recording yet -> one is started, followed, analyzed and opened."""
    app = FFNScopeApp(main_job=True, main_model=str(model_dirs["opt"]), main_tokens=2048)
    async with app.run_test(size=SIZE) as pilot:
        layers = await wait_screen(pilot, LayersScreen, timeout=180)
        assert layers.rec.path == user_cache / "opt.h5" and layers.rec.analyzed
        assert layers.rec.n_tokens == 2048
    # a second start finds the recording and opens it without a new job
    app = FFNScopeApp(main_job=True, main_model=str(model_dirs["opt"]), main_tokens=2048)
    async with app.run_test(size=SIZE) as pilot:
        await wait_screen(pilot, LayersScreen, timeout=30)
        assert not app.started_jobs
