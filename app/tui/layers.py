"""Layers: one row per layer (dead %, alive frequency, detectors, positional neurons by type,
suppression) and one-line bar charts of the same figures, which are the layer table's
(engine.explore.tables.layer_figures). Enter opens the layer's neurons. Suppression is shown in one
of its two readings at a time, named in the column's title: the paper's (raw logit) first, s
switches to the z-score one (engine.analysis.suppression)."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from ffnscope.app.tui.base import HELP_KEY, FramedScreen
from ffnscope.app.tui.cells import pct, spark
from ffnscope.app.tui.export import export_table
from ffnscope.app.tui.modals import ExportScreen
from ffnscope.app.tui.recording import OpenRecording
from ffnscope.cache.provenance import RecordingInfo
from ffnscope.app.tui.table import Column, VirtualTable
from ffnscope.engine.analysis.dead import primary_is_tau0, rule_short
from ffnscope.engine.analysis.ngrams import support_rule
from ffnscope.engine.explore.tables import layer_table

# shares are fractions in the figures and exports, shown here as %; every such title says "%"
COLUMNS = [Column("layer", "layer", 5), Column("dead", "dead %", 6), Column("alive", "alive freq %", 12),
           Column("tok", "1g det", 6), Column("big", "2g det", 6), Column("tri", "3g det", 6),
           Column("supp", "supp% logit", 11), Column("pos", "positional (by type)", 0, "left", min=10)]
POS_SHORT = {"oscillatory": "osc", "both_extremes": "both", "one_extreme": "one", "other": "oth"}
CHARTS = (("dead %", "dead_frac"), ("alive freq %", "alive_freq"), ("token det", "token_detectors"),
          ("positional", "positional"))


def columns_for(rec: RecordingInfo) -> list[Column]:
    """COLUMNS, with dead labelled by its threshold: beside a stricter rule than the paper's (tau 0),
    the paper's dead ("dead τ=0", never activated) too, and a relative rule's per-layer tau_l."""
    if primary_is_tau0(rec):
        return COLUMNS
    rule = [Column("tau", "τ_l", 6)] if rec.is_relative else []
    dead = [Column("dead", f"dead {'τ_l' if rec.is_relative else rule_short(rec)} %", 10),
            Column("dead0", "dead τ=0 %", 10)]
    return [COLUMNS[0], *rule, *dead, *COLUMNS[2:]]


def charts_for(rec: RecordingInfo) -> tuple:
    if primary_is_tau0(rec):
        return CHARTS
    return ((f"dead {'τ_l' if rec.is_relative else rule_short(rec)} %", "dead_frac"), *CHARTS[1:])


def _count(value) -> str:
    """A layer figure's count; "-" where nothing measured it (NaN)."""
    return "-" if value != value else str(int(value))


class LayersScreen(FramedScreen):
    HELP_TITLE = "Layers: per-layer figures of one recording"
    BINDINGS = FramedScreen.BINDINGS + [
        Binding("enter", "open", "neurons", key_display="⏎", tooltip="the layer's neurons"),
        Binding("a", "all", "all neurons", tooltip="the neurons of every layer"),
        Binding("e", "export", "export", tooltip="export the layer table (as `ffnscope export --table layers`)"),
        Binding("n", "npl", "NPL", tooltip="Neuron Predictability Lens: maps, substitution, background neurons"),
        Binding("A", "analyze", "analyze", tooltip="run the analyses (a job)"),
        Binding("s", "reading", "supp reading", show=False,
                tooltip="suppression's reading: raw logit < 0 (the paper's) or z-score < 0 (vs the vocabulary)"),
        HELP_KEY,
    ]
    EXTRA_HELP = [("j k ↑ ↓", "move"), ("← → h l", "scroll the columns sideways")]
    DEFAULT_CSS = FramedScreen.DEFAULT_CSS + "LayersScreen #charts { height: auto; max-height: 5; }"

    def __init__(self, rec: OpenRecording):
        super().__init__()
        self.rec = rec
        self.figures = rec.index.per_layer(dead_sq=False)  # the one figure not shown reads g_sumsq
        self.reading = "logit"  # suppression's reading shown: "logit" (the paper's) or "z"

    def compose(self) -> ComposeResult:
        yield from self.frame_top()
        yield VirtualTable(self._columns(), id="layers")
        yield Static(id="charts")
        yield from self.frame_bottom()

    def _columns(self) -> list[Column]:
        """columns_for the recording, the positional breakdown as wide as its longest cell (the
        table scrolls sideways when the terminal is narrower)."""
        longest = max([len(self._cell(i, "pos")) for i in range(len(self.figures["layer"]))] + [10])
        return [Column(c.key, c.title, c.width, c.align, min=longest) if c.key == "pos" else
                Column(c.key, f"supp% {self.reading}", c.width, c.align) if c.key == "supp" else c
                for c in columns_for(self.rec.prov.recording)]

    def rebind(self, rec: OpenRecording) -> None:
        self.rec, self.figures = rec, rec.index.per_layer(dead_sq=False)
        self.query_one(VirtualTable).set_columns(self._columns())
        self.on_mount()

    def on_mount(self) -> None:
        missing = [name for name, ok in self.rec.index.analyses.items() if not ok]
        note = f" · not analyzed yet ({', '.join(missing)}): A runs the analyses" if missing else ""
        if self.rec.index.pos_note:  # "too few sequences per position (N) to call positional neurons"
            note += f" · {self.rec.index.pos_note.split(':')[0]}"
        self.set_header(self.rec.title(), self.rec.status, f"Recordings > {self.rec.name} > Layers{note}")
        table = self.query_one(VirtualTable)
        table.show(len(self.figures["layer"]), self._cell, cursor=table.cursor)
        table.focus()
        self.call_after_refresh(self._charts)

    def on_resize(self) -> None:
        self._charts()

    def _charts(self) -> None:
        width = max(self.app.size.width - 16, 10)
        text = Text()
        if self.rec.index.analyses["ngrams"]:  # the support rule behind the 1g/2g/3g det counts above
            text.append(f" {support_rule(self.rec.index.min_occurrences)}\n", style="dim")
        charts = charts_for(self.rec.prov.recording)
        for i, (label, key) in enumerate(charts):
            text.append(f" {label:>13} ", style="bold")
            text.append(spark(self.figures[key].tolist(), width))
            if i < len(charts) - 1:
                text.append("\n")
        self.query_one("#charts", Static).update(text)

    def _cell(self, i: int, key: str) -> str:
        f = self.figures
        ngram = bool(f["ngram_layer"][i])
        if key == "layer":
            return str(f["layer"][i])
        if key == "dead":
            return pct(float(f["dead_frac"][i]), 1)
        if key == "dead0":
            return pct(float(f["dead_tau0_frac"][i]), 1)
        if key == "tau":
            return f"{f['tau'][i]:.3g}"
        if key == "alive":
            return pct(float(f["alive_freq"][i]), 2) or "-"  # NaN: no alive neuron
        if key in ("tok", "big", "tri"):
            name = {"tok": "token_detectors", "big": "bigram_detectors", "tri": "trigram_detectors"}[key]
            return _count(f[name][i]) if ngram and self.rec.index.analyses["ngrams"] else "-"
        if key == "pos":
            if not self.rec.index.analyses["positional"]:
                return "-"
            if self.rec.index.pos_note:
                return "- (too few seqs)"
            kinds = [f"{_count(f[f'pos_{k}'][i])} {s}" for k, s in POS_SHORT.items() if f[f"pos_{k}"][i] > 0]
            return _count(f["positional"][i]) + (f" ({' '.join(kinds)})" if kinds else "")
        if key == "supp":
            value = float(f[f"suppress_frac_{self.reading}"][i])
            return "-" if value != value else pct(value, 0)
        return ""

    def action_reading(self) -> None:
        self.reading = "z" if self.reading == "logit" else "logit"
        self.query_one(VirtualTable).set_columns(self._columns())
        self.on_mount()

    def action_open(self) -> None:
        from ffnscope.app.tui.neurons import NeuronsScreen

        table = self.query_one(VirtualTable)
        if table.count:
            self.app.push_screen(NeuronsScreen(self.rec, int(self.figures["layer"][table.cursor])))

    def on_virtual_table_chosen(self, event: VirtualTable.Chosen) -> None:
        self.action_open()

    def action_all(self) -> None:
        from ffnscope.app.tui.neurons import NeuronsScreen

        self.app.push_screen(NeuronsScreen(self.rec, None))

    def action_npl(self) -> None:
        from ffnscope.app.tui.npl import NplScreen

        self.app.push_screen(NplScreen(self.rec))

    def action_analyze(self) -> None:
        self.app.start_analysis(self.rec.path)

    def action_export(self) -> None:
        """The same table as `ffnscope export --table layers` (same columns, fractions)."""
        reader, index = self.rec.reader, self.rec.index  # the figures on screen: one computation (layer_figures)

        def done(choice):
            if choice is not None:
                export_table(self.app, lambda: layer_table(reader, index), *choice)
        self.app.push_screen(ExportScreen("layer table", len(self.figures["layer"]),
                                          self.app.export_path(self.rec, "-layers"), self.rec.path), done)

