"""The Textual explorer driven with Pilot over a real planted, analyzed recording."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from ffnscope.app.tui.app import FFNScopeApp
from ffnscope.app.tui.detail import DetailScreen
from ffnscope.app.tui.layers import LayersScreen
from ffnscope.app.tui.modals import ChooseScreen, ExportScreen, HelpScreen
from ffnscope.app.tui.neurons import NeuronsScreen, parse_range
from ffnscope.app.tui.recordings import RecordingsScreen
from ffnscope.app.tui.table import VirtualTable
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore.tables import NEURON_KINDS, neuron_table
from ffnscope.engine.table.filter import filter_rows
from ffnscope.engine.table.export import read_back
from tests.tiny_models import OSCILLATING
from tests.tui_helpers import raw_screen, screen_text, settle, wait_for, wait_screen

SIZE = (80, 24)


def expected_rows(cache, where: str) -> list[dict]:
    with CacheReader(cache) as reader:
        table = neuron_table(reader)
    return list(table.take(filter_rows(table, where)).rows())


def shown(screen: NeuronsScreen) -> list[tuple[int, int]]:
    cols = screen.index.cols
    return [(int(cols["layer"][r]), int(cols["neuron"][r])) for r in screen.rows]


async def open_neurons(pilot, layer: int = 0) -> NeuronsScreen:
    layers = await wait_screen(pilot, LayersScreen)
    layers.query_one(VirtualTable).cursor = layer
    await pilot.press("enter")
    return await wait_screen(pilot, NeuronsScreen)


async def choose(pilot, value: str) -> None:
    """Pick an entry of the ChooseScreen on top by its id, with the keyboard."""
    screen = await wait_screen(pilot, ChooseScreen)
    ids = [v for v, _ in screen.choices]
    await pilot.press("home", *["down"] * ids.index(value), "enter")
    await settle(pilot)


async def test_filter_detail_plot_export(hostile_cache, tmp_path):
    app = FFNScopeApp([hostile_cache], dirs=[], export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        neurons = await open_neurons(pilot, 0)
        expected = expected_rows(hostile_cache, "layer == 0 and token_detector")
        assert expected and len(neurons.rows) == 64
        await pilot.press("t")
        await choose(pilot, "token")
        assert shown(neurons) == [(r["layer"], r["neuron"]) for r in expected]
        assert f"{len(expected)} match" in screen_text(app)
        assert "detectors: triggers seen >=" in screen_text(app)  # a count of detectors shows its rule
        await pilot.press("enter")
        detail = await wait_screen(pilot, DetailScreen)
        text = screen_text(app)
        assert f"neuron {expected[0]['neuron']}" in text and "token detector" in text
        assert "firing frequency by position" in text and "position" in text
        assert detail.detail.pos_freq.shape == (32,)
        await pilot.press("escape")
        await wait_screen(pilot, NeuronsScreen)
        await pilot.press("e")
        await wait_screen(pilot, ExportScreen)
        await pilot.press("enter")  # CSV, the first format; focus moves to the path
        app.screen.query_one("#path").value = str(tmp_path / "detectors.csv")
        await pilot.press("enter")
        await settle(pilot)
        assert any("wrote" in n.message for n in app._notifications)
    assert read_back(tmp_path / "detectors.csv", "csv", NEURON_KINDS) == expected


async def test_positional_search_sort_and_all_layers(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        neurons = await open_neurons(pilot, 0)
        await pilot.press("p")
        await choose(pilot, "oscillatory+")
        want = expected_rows(hostile_cache, "layer == 0 and positional and pos_type == 'oscillatory' and pos_strong")
        assert shown(neurons) == [(r["layer"], r["neuron"]) for r in want] and (0, OSCILLATING) in shown(neurons)
        await pilot.press("c")  # clear
        await settle(pilot)
        await pilot.press("m")
        await pilot.press(*"0.1-", "enter")
        await settle(pilot)
        want = expected_rows(hostile_cache, "layer == 0 and pos_mi >= 0.1")
        assert shown(neurons) == [(r["layer"], r["neuron"]) for r in want]
        await pilot.press("c", "slash")
        await settle(pilot)
        await pilot.press(*"RED", "enter")  # case-insensitive search inside the hostile trigger
        await settle(pilot)
        hits = [(r["layer"], r["neuron"]) for r in expected_rows(hostile_cache, "layer == 0")
                if any("red" in t.lower() for t in r["trigger_tokens"] + r["trigger_bigrams"] + r["trigger_trigrams"])]
        assert hits and shown(neurons) == hits
        await pilot.press("c", "a")  # all layers
        await settle(pilot)
        assert len(neurons.rows) == neurons.index.n == 4 * 64
        await pilot.press("s")
        await choose(pilot, "fire_freq")
        freq = neurons.index.cols["fire_freq"][neurons.rows]
        assert np.all(np.diff(freq) <= 0)  # descending by default for frequencies
        await pilot.press("r")
        await settle(pilot)
        assert np.all(np.diff(neurons.index.cols["fire_freq"][neurons.rows]) >= 0)
        await pilot.press("f")
        await pilot.press(*"10-20", "enter")
        await settle(pilot)
        freq = neurons.index.cols["fire_freq"][neurons.rows]
        assert len(freq) and freq.min() >= 0.10 and freq.max() <= 0.20
        assert len(freq) == len(expected_rows(hostile_cache, "fire_freq >= 0.1 and fire_freq <= 0.2"))


async def test_bad_range_is_refused_in_place(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        neurons = await open_neurons(pilot, 0)
        await pilot.press("f", *"abc", "enter")
        await pilot.pause()
        assert "MIN-MAX" in screen_text(app)  # the dialog stays, saying what to write
        await pilot.press("escape")
        await settle(pilot)
        assert len(neurons.rows) == 64


def test_parse_range():
    assert parse_range("0.5-2", 100) == (0.005, 0.02)
    assert parse_range("-2", 1) == (None, 2.0) and parse_range("3-", 1) == (3.0, None)
    assert parse_range("", 1) == (None, None)
    for bad in ("x", "2-1", "1"):
        with pytest.raises(ValueError):
            parse_range(bad, 1)


async def test_hostile_strings_display_literally(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=(160, 40)) as pilot:
        neurons = await open_neurons(pilot, 0)
        await pilot.press("t")
        await choose(pilot, "token")
        await pilot.press("enter")
        await wait_screen(pilot, DetailScreen)
        text, raw = screen_text(app), raw_screen(app)  # the detail screen
        assert r"\x1b[31mred\x1b[0m" in text and r"[bold]b[/bold]\r\x00" in text
        assert "\x1b[31mred" not in raw and "\r" not in raw and "\x00" not in raw
        await pilot.press("escape")
        await settle(pilot)
        text, raw = screen_text(app), raw_screen(app)
        assert r'"\x1b[31mred\x1b[0m"' in text and "\x1b[31mred" not in raw and "\x00" not in raw
        assert neurons.rows.size


async def test_layers_screen_figures(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        layers = await wait_screen(pilot, LayersScreen)
        with CacheReader(hostile_cache) as reader:
            from ffnscope.engine.explore.tables import layer_table

            table = layer_table(reader)
        f = layers.figures
        np.testing.assert_allclose(f["dead_frac"], table["dead_frac"])
        np.testing.assert_allclose(f["alive_freq"], table["alive_freq"])
        for key in ("token_detectors", "bigram_detectors", "trigram_detectors", "positional", "pos_strong"):
            known = [np.nan if v is None else v for v in table[key].tolist()]  # None in the table: NaN here
            np.testing.assert_array_equal(f[key], np.asarray(known, float), err_msg=key)
        text = screen_text(app)
        assert "dead %" in text and "alive freq" in text and any(ch in text for ch in "▁▂▃▄▅▆▇█")
        await pilot.press("a")
        neurons = await wait_screen(pilot, NeuronsScreen)
        assert len(neurons.rows) == 4 * 64


async def test_error_rows_for_bad_files(hostile_cache, tmp_path):
    truncated = tmp_path / "truncated.h5"
    data = hostile_cache.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    future = tmp_path / "future.h5"
    future.write_bytes(data)
    with h5py.File(future, "a") as f:
        f.attrs["schema_version"] = 99
    app = FFNScopeApp([truncated, future, tmp_path / "missing.h5", hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        screen = await wait_screen(pilot, RecordingsScreen)
        await wait_for(pilot, lambda: len(screen.rows) == 4, what="four rows")
        statuses = {row.path.name: row.status() for row in screen.rows}
        assert statuses == {"truncated.h5": "error", "future.h5": "error", "missing.h5": "error",
                            "c.h5": "complete"}
        await pilot.press("home")
        await pilot.pause()
        assert "truncated or foreign" in screen_text(app)
        await pilot.press("down")
        await pilot.pause()
        assert "schema v99" in screen_text(app)
        await pilot.press("enter")  # opening an error row says why; the app goes on
        await pilot.pause()
        assert isinstance(app.screen, RecordingsScreen)


async def test_help_and_palette(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await open_neurons(pilot, 0)
        await pilot.press("f1")
        await wait_screen(pilot, HelpScreen)
        text = screen_text(app)
        assert "detector" in text and "firing frequency range" in text and "esc" in text
        await pilot.press("escape")
        await wait_screen(pilot, NeuronsScreen)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Filter: detectors")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_screen(pilot, ChooseScreen)
        await pilot.press("escape")
        await pilot.press("j", "j")  # hidden j/k aliases move the cursor
        await pilot.pause()
        assert app.screen.query_one(VirtualTable).cursor == 2
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


async def test_compare_two_recordings(hostile_cache, tmp_path):
    other = tmp_path / "copy.h5"
    other.write_bytes(hostile_cache.read_bytes())
    app = FFNScopeApp([hostile_cache, other], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        screen = await wait_screen(pilot, RecordingsScreen)
        await wait_for(pilot, lambda: len(screen.rows) == 2, what="two rows")
        await pilot.press("home", "m", "m", "c")
        from ffnscope.app.tui.compare import CompareScreen

        await wait_screen(pilot, CompareScreen)
        assert "comparing 2 recordings" in screen_text(app)
        assert "dead neurons" in screen_text(app)


def test_explorer_does_not_import_torch(hostile_cache):
    """Browsing an existing cache must start fast on a machine where torch takes seconds to import."""
    import subprocess
    import sys

    from tests.conftest import env_for_subprocess

    probe = (
        "import asyncio, sys\n"
        "from ffnscope.app.tui.app import FFNScopeApp\n"
        "from ffnscope.app.tui.neurons import NeuronsScreen\n"
        "from tests.tui_helpers import wait_screen\n"
        "from ffnscope.app.tui.layers import LayersScreen\n"
        "async def main():\n"
        "    app = FFNScopeApp([sys.argv[1]], dirs=[])\n"
        "    async with app.run_test(size=(80, 24)) as pilot:\n"
        "        await wait_screen(pilot, LayersScreen)\n"
        "        await pilot.press('a')\n"
        "        await wait_screen(pilot, NeuronsScreen)\n"
        "        await pilot.press('enter')\n"
        "        await pilot.app.workers.wait_for_complete()\n"
        "asyncio.run(main())\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    result = subprocess.run([sys.executable, "-c", probe, str(hostile_cache)], capture_output=True, text=True,
                            env=env_for_subprocess(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("NO-TORCH")
