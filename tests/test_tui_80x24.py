"""Daily use at 80x24 (issue 12): footers list every key, status lines and names are not cut, wide
tables scroll sideways, unknown values say why, and one unit per quantity across the app, exports
and --where. Driven with Pilot over the planted, analyzed recording."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ffnscope.app.tui.app import FFNScopeApp
from ffnscope.app.tui.detail import DetailScreen
from ffnscope.app.tui.layers import LayersScreen
from ffnscope.app.tui.modals import ChooseScreen, ExportScreen, HelpScreen
from ffnscope.app.tui.neurons import NeuronsScreen
from ffnscope.app.tui.recordings import RecordingsScreen
from ffnscope.app.tui.table import VirtualTable
from ffnscope.engine.explore.tables import LAYER_KINDS
from ffnscope.engine.table.export import read_back
from tests.tui_helpers import screen_text, settle, wait_for, wait_screen

SIZE = (80, 24)


def lines(app) -> list[str]:
    return screen_text(app).splitlines()


def words(app) -> str:
    """The screen's text with every run of whitespace (line ends too) as one space."""
    return " ".join(screen_text(app).split())


def footer_labels(screen) -> list[str]:
    """"key label" of every binding the screen's footer should show."""
    out = []
    for binding in screen.BINDINGS:
        if binding.show and binding.description and binding.key != "escape":  # esc: F1 and the convention
            out.append(f"{binding.key_display or screen.app.get_key_display(binding)} {binding.description}")
    return out


def assert_footer_complete(app) -> None:
    footer = lines(app)[SIZE[1] - 1]
    missing = [label for label in footer_labels(app.screen) if label not in footer]
    assert not missing, f"footer {footer!r} lacks {missing}"


async def open_neurons(pilot) -> NeuronsScreen:
    await wait_screen(pilot, LayersScreen)
    await pilot.press("enter")
    return await wait_screen(pilot, NeuronsScreen)


async def test_footers_list_every_key(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_screen(pilot, LayersScreen)
        assert_footer_complete(app)
        neurons = await open_neurons(pilot)
        assert_footer_complete(app)
        footer = lines(app)[-1]
        for key in "dtpfmbsrcae":  # the filter and sort keys the old footer cut off
            assert re.search(rf"(^| ){key} \w", footer), (key, footer)
        assert "⏎ open" in footer and "/ find" in footer
        await pilot.press("enter")
        await wait_screen(pilot, DetailScreen)
        assert_footer_complete(app)
        await pilot.press("escape")
        await wait_screen(pilot, NeuronsScreen)
        await pilot.press("escape")
        await wait_screen(pilot, LayersScreen)
        await pilot.press("escape")
        await wait_screen(pilot, RecordingsScreen)
        assert_footer_complete(app)
        assert neurons.rows.size


async def test_status_line_is_not_cut(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        neurons = await open_neurons(pilot)
        await pilot.press("t")
        await wait_screen(pilot, ChooseScreen)
        await pilot.press("home", "down", "enter")  # any detector
        await settle(pilot)
        await pilot.press("f", *"1-50", "enter")
        await settle(pilot)
        await pilot.press("s")
        await wait_screen(pilot, ChooseScreen)
        await pilot.press("home", "down", "down", "enter")  # firing frequency, descending
        await settle(pilot)
        text = words(app)
        assert f"64 neurons · {len(neurons.rows)} match" in text
        assert "sort: firing frequency ↓" in text
        assert "filter: any detector, freq 1..50%" in text


async def test_names_sharing_a_prefix_stay_distinguishable(hostile_cache, tmp_path):
    stem = "smollm2-default-16k-tokens-of-the-builtin-corpus"
    first, second = tmp_path / f"{stem}-a.h5", tmp_path / f"{stem}-b.h5"
    for path in (first, second):
        shutil.copy(hostile_cache, path)
    app = FFNScopeApp([first, second], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        screen = await wait_screen(pilot, RecordingsScreen)
        await wait_for(pilot, lambda: len(screen.rows) == 2, what="two rows")
        shown = lines(app)[3:5]
        names = [line.split()[0] for line in shown]
        assert names[0] != names[1], shown
        assert names[0].endswith("-a.h5") and names[1].endswith("-b.h5") and "…" in names[0]
        assert names[0].startswith("smollm2-")
        await pilot.press("home", "m", "m", "c")
        from ffnscope.app.tui.compare import CompareScreen

        await wait_screen(pilot, CompareScreen)
        text = screen_text(app)
        assert f"{stem}-a" in text and f"{stem}-b" in text  # whole names in the legend
        assert all(len(line) <= SIZE[0] for line in text.splitlines())


async def test_wide_layer_table_scrolls_sideways(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        layers = await wait_screen(pilot, LayersScreen)
        table = layers.query_one(VirtualTable)
        full = [layers._cell(i, "pos") for i in range(table.count)]
        assert table.total_width > SIZE[0]  # the positional breakdown needs more than 80 columns
        header = lines(app)[2]
        assert header.rstrip().endswith("›") and "…" not in "".join(lines(app)[3:3 + table.count])
        await pilot.press(*["l"] * 4)
        await pilot.pause()
        shown = lines(app)
        assert shown[2].startswith("‹")
        for i, text in enumerate(full):
            assert shown[3 + i].rstrip().endswith(text), (shown[3 + i], text)


async def test_units_labels_and_layer_export(hostile_cache, tmp_path):
    """Shares are fractions in exports and figures, shown as % under titles that say so; the app's
    layer export is `ffnscope export --table layers`, written beside the recording by default."""
    from ffnscope.app.export_view import run_export

    cache = tmp_path / "rec" / "units.h5"
    cache.parent.mkdir()
    shutil.copy(hostile_cache, cache)
    app = FFNScopeApp([cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        layers = await wait_screen(pilot, LayersScreen)
        header = lines(app)[2]
        assert "dead %" in header and "alive freq %" in header and "supp% logit" in header
        for key in ("dead_frac", "dead_tau0_frac", "alive_freq", "suppress_frac_logit", "suppress_frac_z"):
            values = layers.figures[key]
            assert ((values >= 0) & (values <= 1) | (values != values)).all(), key
        await pilot.press("e")
        export = await wait_screen(pilot, ExportScreen)
        path = Path(export.query_one("#path").value)
        assert path.parent == cache.parent and path.name == "units-layers.csv"
        await pilot.press("enter", "enter")
        await wait_for(pilot, lambda: path.exists() and any("wrote" in n.message for n in app._notifications),
                       what="the layer export")
        await wait_screen(pilot, LayersScreen)
        await pilot.press("enter")  # the neurons' frequency filter says its unit
        await wait_screen(pilot, NeuronsScreen)
        await pilot.press("f")
        await pilot.pause()
        text = words(app)
        assert "in % of tokens" in text and "`--where fire_freq` takes the fraction: 1 % is 0.01" in text
        await pilot.press("escape")
    cli = tmp_path / "cli-layers.csv"
    run_export(SimpleNamespace(file=cache, layers=None, table="layers", dead=None, detector=None, positional=None,
                               where=None, out=cli, format="csv", force=False))
    app_rows, cli_rows = read_back(path, "csv", LAYER_KINDS), read_back(cli, "csv", LAYER_KINDS)
    assert app_rows == cli_rows
    assert {"rel_depth", "detected_tokens", "dead_frac", "alive_freq"} <= set(app_rows[0])
    assert "dead_pct" not in app_rows[0] and all(0 <= r["dead_frac"] <= 1 for r in app_rows)


async def test_detail_unknowns_ticks_and_help(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        layers = await wait_screen(pilot, LayersScreen)
        outside = next(i for i in range(len(layers.figures["layer"])) if not layers.figures["ngram_layer"][i])
        layers.query_one(VirtualTable).cursor = outside
        await pilot.press("enter")
        neurons = await wait_screen(pilot, NeuronsScreen)
        await pilot.press("f1")
        await wait_screen(pilot, HelpScreen)
        help_lines = [line.split() for line in lines(app)]
        assert sum(1 for parts in help_lines if parts[:1] in (["⏎"], ["enter"])) == 1
        assert sum(1 for parts in help_lines if parts[:1] == ["f"]) == 1
        await pilot.press("escape")
        await wait_screen(pilot, NeuronsScreen)
        await pilot.press("enter")
        detail = await wait_screen(pilot, DetailScreen)
        await wait_for(pilot, lambda: detail.detail is not None, what="the detail")
        text = words(app)
        assert "coverage number - (n-grams not counted in this layer)" in text
        assert "NPL predictability: - (no NPL fit yet" in text and "npl_pearson" not in text
        axis = next(line for line in lines(app) if re.match(r"^\s+0\s+\d+\s+\d+", line))
        seq_len = len(detail.detail.pos_freq)
        assert axis.split()[-1] == str(seq_len - 1) and all(tick.isdigit() for tick in axis.split())
        assert neurons.rows.size


async def test_sort_key_gets_a_column_and_j_moves_in_popups(hostile_cache):
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        neurons = await open_neurons(pilot)
        await pilot.press("t")
        choose = await wait_screen(pilot, ChooseScreen)
        options = choose.query_one("OptionList")
        await pilot.press("home", "j", "j")
        await pilot.pause()
        assert options.highlighted == 2
        await pilot.press("k", "enter")
        await settle(pilot)
        assert neurons.filter.detector == "any"
        await pilot.press("c")
        await settle(pilot)
        for key, title in (("npl_pearson", "NPL r"), ("g_mean", "g mean")):
            await pilot.press("s")
            choose = await wait_screen(pilot, ChooseScreen)
            ids = [value for value, _ in choose.choices]
            await pilot.press("home", *["j"] * ids.index(key), "enter")
            await settle(pilot)
            assert neurons.sort == key
            header = lines(app)[3]
            assert title in header, header
        first = int(neurons.rows[0])
        value = neurons.index.known("g_mean", first)
        assert f"{value:.3f}" in lines(app)[4]


@pytest.fixture
def fake_npl(monkeypatch):
    """The NPL screen over made-up results of a 12-layer model: a full grid and a functional table."""
    from ffnscope.app.tui import npl
    from ffnscope.engine.npl.overview import NplOverview
    from ffnscope.engine.npl.report import FUNCTIONAL_KINDS

    n = 12

    def overview(path, meta=None):
        pairs = {(i, j): {"token_l2": 0.1 * (i + j + 1), "mean_pearson": 0.5, "fvu": 0.2}
                 for i in range(n) for j in range(n)}
        rows = [{"layer": layer, "kind": kind, "S": 0.12345, "S_all": 0.2, "S_random": 0.3, "background_frac": 0.05}
                for layer in range(n) for kind in FUNCTIONAL_KINDS]
        return NplOverview(Path("x.npl.h5"), meta={"fit": {"fit_tokens": 1000, "heldout_tokens": 100},
                                                   "model": {"n_layers": n}},
                           pairs={"exact": pairs}, results={"functional": {"rows": rows, "params": {}}})
    monkeypatch.setattr(npl, "overview", overview)
    return n


async def test_npl_heatmap_labels_and_unwrapped_tables(hostile_cache, fake_npl):
    from ffnscope.app.tui.npl import NplScreen

    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_screen(pilot, LayersScreen)
        await pilot.press("n")
        screen = await wait_screen(pilot, NplScreen)
        await wait_for(pilot, lambda: screen.loads > 0, what="the NPL results")
        shown = lines(app)
        labels = next(line for line in shown if re.match(r"^\s+0\s+2\s", line))
        assert labels.split() == [str(j) for j in range(0, fake_npl, 2)]  # every other one, apart
        assert "91011" not in screen_text(app)
        assert_footer_complete(app)
        await pilot.press("end")
        await settle(pilot)
        shown = lines(app)
        rows = [line for line in shown if "0.1235" in line]
        assert rows and all(re.match(r"^\s+\d+\s+0\.1235", line) for line in rows), rows  # one row per line
        assert len(rows) == len({line.split()[0] for line in rows})
        await pilot.press(*["l"] * 8)
        await settle(pilot)
        assert "bg%" in screen_text(app)  # the table's right end, scrolled to


async def test_record_form_hints_fit(tmp_path, monkeypatch):
    """Every field's placeholder is whole inside its input at 80 columns."""
    from textual.widgets import Input

    from ffnscope.app.tui.record_form import RecordFormScreen

    monkeypatch.setenv("FFNSCOPE_CACHE_DIR", str(tmp_path / "uc"))
    app = FFNScopeApp(dirs=None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.push_screen(RecordFormScreen())
        await wait_screen(pilot, RecordFormScreen)
        await settle(pilot)
        inputs = list(app.screen.query(Input))
        assert len(inputs) >= 8
        for field in inputs:
            assert len(field.placeholder) <= field.content_region.width, (field.id, field.content_region.width)
        shown = words(app)
        for field in inputs:
            if not field.value:
                assert field.placeholder in shown, field.placeholder
