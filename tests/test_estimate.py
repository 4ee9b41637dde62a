"""engine.explore.estimate: the arithmetic of the dialogs' duration estimates, and where the speed comes from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ffnscope.engine.explore import estimate
from ffnscope.engine.explore.catalog import RecordingSummary
from ffnscope.engine.explore.estimate import Speed
from tests.test_tui_80x24 import fake_npl  # noqa: F401 (a fixture: made-up NPL results)


def test_estimate_seconds_and_words():
    assert estimate.estimate_seconds(76 * 720, 76.0) == pytest.approx(720.0)
    assert estimate.estimate_seconds(1000, 100.0, work=16) == pytest.approx(160.0)
    with pytest.raises(ValueError):
        estimate.estimate_seconds(10, 0.0)
    assert estimate.human(20) == "under a minute"
    assert estimate.human(12 * 60 + 10) == "12 min"
    assert estimate.human(2 * 3600 + 5 * 60) == "2 h 05 min"


def test_describe():
    speed = Speed(76.0, "a.h5", layers_run=30)
    assert estimate.describe(76 * 720, speed) == "about 12 min at 76 tok/s (measured on a.h5)"
    assert estimate.describe(76 * 720, speed, rough=True).endswith("(measured on a.h5), rough")
    # twice the layers run: half the speed, twice the time
    assert estimate.describe(76 * 720, speed, layers_run=60) == "about 24 min at 38 tok/s (measured on a.h5)"
    assert estimate.describe(None, speed) == ""
    assert estimate.describe(1000, None).startswith("no estimate yet")


def _progress(cache: Path, **fields) -> None:
    state = {"status": "complete", "command": ["python", "-m", "ffnscope", "record", "--model", "default"],
             "tokens_per_s": 50.0, "n_layers": 30, "started": 1.0, "updated": 2.0}
    state.update(fields)
    cache.with_name(cache.name + ".progress.json").write_text(json.dumps(state))


def test_recording_speed_from_progress_file(tmp_path):
    cache = tmp_path / "a.h5"
    assert estimate.recording_speed(cache) is None  # no progress file
    _progress(cache)
    assert estimate.recording_speed(cache) == Speed(50.0, "a.h5", 30)
    for bad in ({"status": "running"}, {"tokens_per_s": None}, {"tokens_per_s": 0}, {"tokens_per_s": True},
                {"command": ["python", "-m", "ffnscope", "analyze", "a.h5"]}):
        _progress(cache, **bad)
        assert estimate.recording_speed(cache) is None, bad


def test_latest_speed_picks_newest_complete_recording_of_the_model(tmp_path):
    rows = []
    for name, created, rate, model in (("old.h5", "2026-01-01T00:00:00Z", 10.0, "default"),
                                       ("new.h5", "2026-02-01T00:00:00Z", 20.0, "default"),
                                       ("other.h5", "2026-03-01T00:00:00Z", 99.0, "/m/opt-125m")):
        path = tmp_path / name
        _progress(path, tokens_per_s=rate, command=["record", "--model", model])
        rows.append(RecordingSummary(path=path, name=name, model=Path(model).name, created=created,
                                     status="complete", model_layers=30))
    rows.append(RecordingSummary(path=tmp_path / "broken.h5", name="broken.h5"))  # an error row
    assert estimate.latest_speed(rows, "default") == Speed(20.0, "new.h5", 30, 30)
    assert estimate.latest_speed(rows, "opt-125m").tokens_per_s == 99.0  # by the catalog's short name
    assert estimate.latest_speed(rows, "/m/opt-125m").recording == "other.h5"
    assert estimate.latest_speed(rows, "gpt2") is None
    rows[1].status = "partial"
    assert estimate.latest_speed(rows, "default").recording == "old.h5"


def test_layers_run():
    assert estimate.layers_run("0-11,15", 30) == 16
    assert estimate.layers_run("", 30) == 30
    assert estimate.layers_run(" ", None) is None


async def test_dialogs_show_the_estimate(hostile_cache, tmp_path, fake_npl):
    """The record form and the NPL fit dialog show the estimate from the speed the recording measured,
    and follow the token field."""
    import shutil

    from textual.widgets import Input

    from ffnscope.app.tui.app import FFNScopeApp
    from ffnscope.app.tui.layers import LayersScreen
    from ffnscope.app.tui.modals import ChooseScreen
    from ffnscope.app.tui.npl import NplScreen, TokensScreen
    from ffnscope.app.tui.record_form import RecordFormScreen
    from tests.tui_helpers import screen_text, settle, wait_for, wait_screen

    import h5py

    cache = tmp_path / "c.h5"
    shutil.copyfile(hostile_cache, cache)
    with h5py.File(cache, "a") as f:  # the speed its recording measured, made round
        meta = json.loads(f.attrs["meta"])
        meta["recording"]["tokens_per_s"] = 50.0
        f.attrs["meta"] = json.dumps(meta)
    _progress(cache, tokens_per_s=7.0, n_layers=None)  # the provenance's speed wins over the progress file's
    app = FFNScopeApp([cache], dirs=[])
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_screen(pilot, LayersScreen)
        app.push_screen(RecordFormScreen())
        form = await wait_screen(pilot, RecordFormScreen)
        await wait_for(pilot, lambda: form.recordings is not None, what="the catalog")
        await settle(pilot)
        assert "about 8 min at 50 tok/s (measured on c.h5)" in screen_text(app)  # 24576 tokens
        form.query_one("#tokens", Input).value = "3000"
        await settle(pilot)
        assert "about 1 min at 50 tok/s" in screen_text(app)
        form.query_one("#model", Input).value = "gpt2"
        await settle(pilot)
        assert "no estimate yet" in screen_text(app)
        await pilot.press("escape")
        await wait_screen(pilot, LayersScreen)
        await pilot.press("n")
        npl = await wait_screen(pilot, NplScreen)
        await wait_for(pilot, lambda: npl.loads > 0, what="the NPL results")
        await pilot.press("f")
        await wait_screen(pilot, ChooseScreen)
        await pilot.press("enter")
        ask = await wait_screen(pilot, TokensScreen)
        await settle(pilot)
        assert "about 44 min at 50 tok/s (measured on c.h5), rough" in screen_text(app)  # 131072 tokens
        ask.query_one(Input).value = "x"
        await settle(pilot)
        assert "tok/s" not in screen_text(app)


def test_a_recording_keeps_its_speed_past_later_jobs(tmp_path, model_dirs, text_file):
    """The speed is the recording's provenance: a later analyze job (which rewrites the progress file
    beside the cache) leaves the estimate standing."""
    from ffnscope.engine.jobs.progress import progress_path
    from tests.helpers import record_tiny

    cache = tmp_path / "c.h5"
    state = record_tiny(cache, model_dirs["llama"], [text_file])
    rate = state.meta["recording"]["tokens_per_s"]
    assert rate > 0
    progress_path(cache).write_text('{"status": "complete", "command": ["ffnscope", "analyze"]}')
    assert estimate.recording_speed(cache) == Speed(rate, "c.h5", len(state.meta["recording"]["layers"]))
