"""SVG snapshots of the main screens at 80x24 (pytest-textual-snapshot). Renders differ between
textual releases, so they are compared only on the version scripts/constraints.txt pins (the one
scripts/test.sh installs); on another they skip with the reason.
After an intended change of the screens: pytest tests/test_tui_snapshots.py --snapshot-update,
then look at the SVGs under tests/__snapshots__ before committing them."""
from __future__ import annotations

import re
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest

from ffnscope.app.tui.app import FFNScopeApp
from ffnscope.app.tui.compare import CompareScreen
from ffnscope.app.tui.detail import DetailScreen
from ffnscope.app.tui.layers import LayersScreen
from ffnscope.app.tui.modals import HelpScreen
from ffnscope.app.tui.neurons import NeuronsScreen
from ffnscope.app.tui.npl import NplScreen
from ffnscope.app.tui.record_form import RecordFormScreen
from ffnscope.app.tui.recordings import RecordingsScreen
from tests.test_tui_80x24 import fake_npl  # noqa: F401 (a fixture: made-up NPL results)
from tests.tui_helpers import settle, wait_for, wait_screen

_PIN = re.search(r"^textual==(\S+)", (Path(__file__).parent.parent / "scripts" / "constraints.txt").read_text(), re.M)
pytestmark = pytest.mark.skipif(version("textual") != _PIN.group(1),
                                reason=f"snapshots are of textual {_PIN.group(1)}; this is {version('textual')}")


def app_for(cache) -> FFNScopeApp:
    return FFNScopeApp([cache], dirs=[])


async def to_neurons(pilot) -> None:
    await wait_screen(pilot, LayersScreen)
    await pilot.press("enter")
    await wait_screen(pilot, NeuronsScreen)


def test_recordings_screen(snap_compare, hostile_cache):
    async def run_before(pilot):
        await wait_screen(pilot, LayersScreen)
        await pilot.press("escape")
        screen = await wait_screen(pilot, RecordingsScreen)
        await wait_for(pilot, lambda: len(screen.rows) == 1)
        await settle(pilot)
    assert snap_compare(app_for(hostile_cache), run_before=run_before)


def test_layers_screen(snap_compare, hostile_cache):
    async def run_before(pilot):
        await wait_screen(pilot, LayersScreen)
    assert snap_compare(app_for(hostile_cache), run_before=run_before)


def test_neurons_screen_filtered(snap_compare, hostile_cache):
    async def run_before(pilot):
        await to_neurons(pilot)
        await pilot.press("t", "home", "down", "enter")   # any detector
        await settle(pilot)
    assert snap_compare(app_for(hostile_cache), run_before=run_before)


def test_detail_screen(snap_compare, hostile_cache):
    async def run_before(pilot):
        await to_neurons(pilot)
        await pilot.press("t", "home", "down", "down", "enter")   # token detectors
        await settle(pilot)
        await pilot.press("enter")
        await wait_screen(pilot, DetailScreen)
    assert snap_compare(app_for(hostile_cache), run_before=run_before)


def test_help_screen(snap_compare, hostile_cache):
    async def run_before(pilot):
        await to_neurons(pilot)
        await pilot.press("f1")
        await wait_screen(pilot, HelpScreen)
    assert snap_compare(app_for(hostile_cache), run_before=run_before)


def test_npl_screen(snap_compare, hostile_cache, fake_npl):
    async def run_before(pilot):
        await wait_screen(pilot, LayersScreen)
        await pilot.press("n")
        screen = await wait_screen(pilot, NplScreen)
        await wait_for(pilot, lambda: screen.loads > 0, what="the NPL results")
        await settle(pilot)
    assert snap_compare(app_for(hostile_cache), run_before=run_before)


def test_compare_screen(snap_compare, hostile_cache, tmp_path):
    copies = [tmp_path / "first.h5", tmp_path / "second.h5"]  # fixed names: the legend shows them
    for copy in copies:
        shutil.copyfile(hostile_cache, copy)

    async def run_before(pilot):
        screen = await wait_screen(pilot, RecordingsScreen)
        await wait_for(pilot, lambda: len(screen.rows) == 2, what="two rows")
        await pilot.press("home", "m", "m", "c")
        await wait_screen(pilot, CompareScreen)
        await settle(pilot)
    assert snap_compare(FFNScopeApp(copies, dirs=[]), run_before=run_before)


def test_record_form(snap_compare, hostile_cache):
    """No progress file beside the cache: the form says it has no estimate yet (a measured speed
    would make the snapshot depend on the machine)."""
    async def run_before(pilot):
        await wait_screen(pilot, LayersScreen)
        pilot.app.push_screen(RecordFormScreen())
        screen = await wait_screen(pilot, RecordFormScreen)
        await wait_for(pilot, lambda: screen.recordings is not None, what="the catalog")
        await settle(pilot)
    assert snap_compare(app_for(hostile_cache), run_before=run_before)
