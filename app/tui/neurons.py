"""Neurons: the neuron table of one layer or of all layers, filtered and sorted with numpy in a
worker (engine.explore.index), shown through a virtual table, so millions of rows scroll
like ten. The number of matching rows is always on the status line."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from ffnscope.app.tui.base import FramedScreen
from ffnscope.app.tui.cells import num, pct, tokens, yes_no
from ffnscope.app.tui.export import export_neurons
from ffnscope.app.tui.modals import AskScreen, ChooseScreen, ExportScreen
from ffnscope.app.tui.recording import OpenRecording
from ffnscope.app.tui.table import Column, VirtualTable
from ffnscope.engine.analysis.dead import primary_is_tau0
from ffnscope.engine.analysis.ngrams import support_rule
from ffnscope.engine.explore.index import SORT_KEYS, UNKNOWN, NeuronFilter
from ffnscope.engine.analysis.positional import KINDS

SHORT_KIND = {"oscillatory": "osc", "both_extremes": "both", "one_extreme": "one", "other": "other"}
COLUMNS = [Column("layer", "layer", 5), Column("neuron", "neuron", 6), Column("freq", "freq %", 7),
           Column("cover", "cov", 4), Column("det", "det", 3, "left"), Column("triggers", "triggers", 0, "left"),
           Column("supp", "supp", 4, "left"), Column("mi", "pos MI", 6), Column("type", "type", 11, "left")]
SORT_LABELS = {"layer": "layer, neuron", "neuron": "neuron", "fire_freq": "firing frequency",
               "unigram_coverage": "coverage number", "token_detector": "token detectors first",
               "bigram_detector": "bigram detectors first", "trigram_detector": "trigram detectors first",
               "pos_type": "positional type", "background": "background neurons first", "pos_mi": "positional MI",
               "trigger_logit": "trigger logit (< 0: suppresses, the paper's reading)",
               "trigger_logit_z": "trigger logit z (< 0: suppresses vs the vocabulary)",
               "trigger_g": "g at trigger firings", "g_mean": "mean activation",
               "g_std": "activation std", "g_max": "max activation", "npl_pearson": "NPL Pearson r",
               "npl_l2": "NPL L2 error (predictability score)"}
# the column that shows each sort key; keys without one get a column of their own while sorted by
SORT_COLUMN = {"layer": "layer", "neuron": "neuron", "fire_freq": "freq", "unigram_coverage": "cover",
               "token_detector": "det", "bigram_detector": "det", "trigram_detector": "det", "pos_mi": "mi",
               "pos_type": "type"}
SORT_TITLES = {"trigger_logit": "logit", "trigger_logit_z": "logit z", "trigger_g": "g trig", "g_mean": "g mean",
               "g_std": "g std", "g_max": "g max", "npl_pearson": "NPL r", "npl_l2": "NPL L2", "background": "bg"}


def columns_for(sort: str) -> list[Column]:
    """COLUMNS, plus one for the sort key when no column shows it (after freq %)."""
    if sort in SORT_COLUMN:
        return COLUMNS
    extra = Column("sortkey", SORT_TITLES.get(sort, sort[:7]), 7)
    return [*COLUMNS[:3], extra, *COLUMNS[3:]]


def parse_range(text: str, scale: float) -> tuple[float | None, float | None]:
    """"0.1-2" / "-2" / "0.1-" / "" -> (lo, hi) divided by scale; ValueError if not that."""
    text = text.strip()
    if not text:
        return None, None
    lo, sep, hi = text.partition("-") if not text.startswith("-") else ("", "-", text[1:])
    if not sep:
        raise ValueError
    lo_v = float(lo) / scale if lo.strip() else None
    hi_v = float(hi) / scale if hi.strip() else None
    if lo_v is not None and hi_v is not None and lo_v > hi_v:
        raise ValueError
    return lo_v, hi_v


def _range_error(scale: float):
    def check(text: str) -> str | None:
        try:
            parse_range(text, scale)
        except ValueError:
            return "write MIN-MAX, MIN- or -MAX (numbers), or nothing to clear"
        return None
    return check


class NeuronsScreen(FramedScreen):
    HELP_TITLE = "Neurons: filter, sort and open neurons"
    # every verb on the footer at 80 columns: short labels there, the tooltips in f1's help
    BINDINGS = FramedScreen.BINDINGS + [
        Binding("d", "dead", "dead", tooltip="dead filter: firing rule / never active (τ=0) / alive / any"),
        Binding("t", "detector", "det", tooltip="detector filter: token, bigram or trigram detectors"),
        Binding("p", "positional", "pos", tooltip="positional filter, by type"),
        Binding("f", "freq", "freq", tooltip="firing frequency range, in % of tokens"),
        Binding("m", "mi", "MI", tooltip="positional MI range"),
        Binding("b", "background", "bg", tooltip="NPL background or split-half reproduced neurons (a choice)"),
        Binding("s", "sort", "sort", tooltip="sort by a column (one the table lacks gets a column)"),
        Binding("r", "reverse", "rev", tooltip="reverse the sort order"),
        Binding("slash", "search", "find", key_display="/", tooltip="search trigger n-grams (case-insensitive)"),
        Binding("c", "clear", "clr", tooltip="clear the filters"),
        Binding("a", "all_layers", "all", tooltip="all layers / this layer"),
        Binding("e", "export", "exp", tooltip="export the rows shown (fractions, as `ffnscope export` writes)"),
        Binding("enter", "open", "open", key_display="⏎", tooltip="open the neuron's detail"),
    ]
    EXTRA_HELP = [("j k ↑ ↓ g G", "move (pgup pgdn: a page)"), ("← → h l", "scroll the columns sideways")]
    DEFAULT_CSS = FramedScreen.DEFAULT_CSS + "NeuronsScreen #status { height: auto; max-height: 3; }"

    def __init__(self, rec: OpenRecording, layer: int | None = None):
        super().__init__()
        self.rec, self.index = rec, rec.index
        self.home_layer = layer
        self.filter = NeuronFilter(layers=None if layer is None else (layer,))
        self.sort, self.descending = "layer", False
        self.rows = np.zeros(0, np.int64)
        self.updates = 0  # how many times the rows were replaced (tests and bench/tui_open.py wait on it)
        self.generation = 0  # of the latest filter/sort request

    def compose(self) -> ComposeResult:
        yield from self.frame_top()
        yield Static(id="status", classes="status-line")
        yield VirtualTable(COLUMNS, id="neurons")
        yield from self.frame_bottom()

    def on_mount(self) -> None:
        self.query_one(VirtualTable).focus()
        self.refilter()

    def rebind(self, rec: OpenRecording) -> None:
        self.rec, self.index = rec, rec.index
        self.refilter(keep_cursor=True)

    # --- filtering --------------------------------------------------------------------------------
    def refilter(self, keep_cursor: bool = False) -> None:
        self.generation += 1
        self._compute(replace(self.filter), self.sort, self.descending, keep_cursor, self.generation)

    @work(thread=True, exclusive=True, group="filter")
    def _compute(self, f: NeuronFilter, sort: str, descending: bool, keep_cursor: bool, generation: int) -> None:
        rows = self.index.select(f, sort, descending)
        self.app.call_from_thread(self._show, rows, keep_cursor, generation)

    def _show(self, rows: np.ndarray, keep_cursor: bool, generation: int) -> None:
        if generation != self.generation:
            return  # a thread worker cannot be interrupted; a newer request has superseded this one
        self.rows = rows
        self.updates += 1
        self.call_after_refresh(self.rec.warm_up)  # after the first frame: warming competes with drawing it
        table = self.query_one(VirtualTable)
        table.set_columns(columns_for(self.sort))
        table.show(len(rows), self._cell, cursor=None if keep_cursor else 0)
        self._header()

    def _header(self) -> None:
        scope = "all layers" if self.filter.layers is None else f"layer {self.filter.layers[0]}"
        total = self.index.n if self.filter.layers is None else self.index.d_ffn
        self.set_header(self.rec.title(), self.rec.status, f"Recordings > {self.rec.name} > Layers > "
                        f"Neurons ({scope})")
        order = SORT_LABELS.get(self.sort, self.sort) + (" ↓" if self.descending else "")
        missing = [name for name, ok in self.index.analyses.items() if not ok]
        note = f" · not analyzed: {', '.join(missing)}" if missing else ""
        if self.index.pos_note:  # "too few sequences per position (N) to call positional neurons"
            note += f" · {self.index.pos_note.split(':')[0]}"
        if self.filter.detector and self.index.min_occurrences is not None:  # a count of detectors: its rule
            note += f" · {support_rule(self.index.min_occurrences)}"
        # the count and the order first; the line wraps rather than cutting what follows
        self.query_one("#status", Static).update(Text(
            f" {scope} · {total:,} neurons · {len(self.rows):,} match · sort: {order} · "
            f"filter: {self.filter.describe()}{note}"))

    def _cell(self, i: int, key: str) -> str:
        row = int(self.rows[i])
        index, cols = self.index, self.index.cols
        if key == "layer":
            return str(cols["layer"][row])
        if key == "neuron":
            return str(cols["neuron"][row])
        if key == "freq":
            return pct(float(cols["fire_freq"][row]), 3)
        if key == "sortkey":
            value = index.known(self.sort, row)
            return yes_no(value) if isinstance(value, bool) else "-" if value is None else num(value, 3)
        if key == "cover":
            value = index.known("unigram_coverage", row)
            return "" if value is None else str(value)
        if key == "det":
            return "".join(mark for name, mark in (("token_detector", "T"), ("bigram_detector", "B"),
                                                    ("trigram_detector", "3")) if cols[name][row] == 1)
        if key == "triggers":
            return tokens(index.first_triggers(row))
        if key == "supp":
            return yes_no(index.known("suppresses_logit", row))  # the paper's reading, as the layers screen
        if key == "mi":
            return num(index.known("pos_mi", row), 3)
        if key == "type":
            kind = index.pos_type(row)
            if cols["positional"][row] == UNKNOWN:
                return "-"  # no verdict: too few sequences per position, or not analyzed (the status line says which)
            if not kind or cols["positional"][row] != 1:
                return ""
            return f"{SHORT_KIND[kind]} {'strong' if cols['pos_strong'][row] == 1 else 'weak'}"
        return ""

    # --- actions ----------------------------------------------------------------------------------
    def action_dead(self) -> None:
        """any -> dead at the firing rule -> never activated (the paper's dead, when that differs) ->
        alive -> any."""
        f = self.filter
        state = "never" if f.never_activated else f.dead
        steps = [None, True] + ([] if primary_is_tau0(self.rec.prov.recording) else ["never"]) + [False, None]
        state = steps[steps.index(state) + 1]
        f.dead, f.never_activated = (None, True) if state == "never" else (state, False)
        self.refilter()

    def action_background(self) -> None:
        """NPL background neurons, or the split-half comparison's reproduced / not reproduced neurons: the
        per-neuron flags other jobs add (one key: the footer has no room for another at 80 columns)."""
        f = self.filter
        choices = [("off", "any neuron"), ("background", "NPL background neurons"),
                   ("reproduced", "findings reproduced in a split-half comparison"),
                   ("not_reproduced", "findings not reproduced (found in one half only)")]
        current = "background" if f.background else {True: "reproduced", False: "not_reproduced"}.get(f.reproduced,
                                                                                                        "off")

        def done(value):
            if value is None:
                return
            if value == "background" and not (self.index.cols["background"] != -1).any():
                self.app.notify("no background neurons known: run the NPL fit and functional jobs (NPL screen, n)",
                                severity="warning")
            if value.endswith("reproduced") and not (self.index.cols["reproduced"] != -1).any():
                self.app.notify(self.index.reproduce_note or "no split-half comparison stored here: run "
                                "`ffnscope reproduce A.h5 B.h5 --into` this recording (the merge of A and B)",
                                severity="warning")
            f.background = value == "background"
            f.reproduced = {"reproduced": True, "not_reproduced": False}.get(value)
            self.refilter()
        self.app.push_screen(ChooseScreen("Show neurons flagged by NPL or a split-half comparison", choices, current),
                             done)

    def action_detector(self) -> None:
        choices = [("off", "any neuron"), ("any", "any detector"), ("token", "token detectors"),
                   ("bigram", "bigram detectors"), ("trigram", "trigram detectors")]

        def done(value):
            if value is not None:
                self.filter.detector = None if value == "off" else value
                self.refilter()
        self.app.push_screen(ChooseScreen("Show detectors", choices, self.filter.detector or "off"), done)

    def action_positional(self) -> None:
        choices = [("off", "any neuron"), ("any", "positional, any type"), ("any+", "positional, strong only")]
        for kind in KINDS:
            label = kind.replace("_", " ")
            choices += [(kind, label), (kind + "+", f"{label}, strong only")]
        current = "off" if not self.filter.positional else self.filter.positional + ("+" if self.filter.strong_only else "")

        def done(value):
            if value is not None:
                self.filter.positional = None if value == "off" else value.rstrip("+")
                self.filter.strong_only = value.endswith("+")
                self.refilter()
        self.app.push_screen(ChooseScreen("Show positional neurons", choices, current), done)

    def _ask_range(self, prompt: str, attr: str, scale: float) -> None:
        lo, hi = getattr(self.filter, attr)
        value = "" if lo is None and hi is None else f"{'' if lo is None else f'{lo * scale:g}'}-" \
                                                      f"{'' if hi is None else f'{hi * scale:g}'}"

        def done(text):
            if text is not None:
                setattr(self.filter, attr, parse_range(text, scale))
                self.refilter()
        self.app.push_screen(AskScreen(prompt, value, "MIN-MAX", _range_error(scale)), done)

    def action_freq(self) -> None:
        self._ask_range("Firing frequency range in % of tokens, like the freq % column (0.01-1, -0.5 or 2-; "
                        "empty clears). `--where fire_freq` takes the fraction: 1 % is 0.01", "freq", 100.0)

    def action_mi(self) -> None:
        self._ask_range("Positional MI range (like 0.05-, 0.1-0.5; empty clears)", "mi", 1.0)

    def action_search(self) -> None:
        def done(text):
            if text is not None:
                self.filter.trigger = text
                self.refilter()
        self.app.push_screen(AskScreen("Trigger n-gram contains (case-insensitive; empty clears)",
                                       self.filter.trigger), done)

    def action_sort(self) -> None:
        choices = [(k, SORT_LABELS.get(k, k)) for k in SORT_KEYS]

        def done(value):
            if value is not None:
                self.sort = value
                self.descending = value not in ("layer", "neuron", "unigram_coverage", "pos_type")
                self.refilter()
        self.app.push_screen(ChooseScreen("Sort by (r reverses)", choices, self.sort), done)

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self.refilter()

    def action_clear(self) -> None:
        self.filter = NeuronFilter(layers=self.filter.layers)
        self.refilter()

    def action_all_layers(self) -> None:
        if self.filter.layers is None and self.home_layer is not None:
            self.filter.layers = (self.home_layer,)
        else:
            self.filter.layers = None
        self.refilter()

    def action_open(self) -> None:
        table = self.query_one(VirtualTable)
        if len(self.rows):
            from ffnscope.app.tui.detail import DetailScreen

            self.app.push_screen(DetailScreen(self.rec, self.rows, table.cursor))

    def on_virtual_table_chosen(self, event: VirtualTable.Chosen) -> None:
        self.action_open()

    def action_export(self) -> None:
        suffix = "-neurons" if self.filter.layers is None else f"-layer{self.filter.layers[0]}"

        def done(choice):
            if choice is not None:
                export_neurons(self.app, self.index, self.rows.copy(), *choice)
        self.app.push_screen(ExportScreen("neuron table", len(self.rows), self.app.export_path(self.rec, suffix),
                                          self.rec.path), done)
