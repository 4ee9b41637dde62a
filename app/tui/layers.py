"""Layers: one row per layer (dead %, alive frequency, detectors, positional neurons by type,
suppression) and one-line bar charts of the same figures. Enter opens the layer's neurons."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from app.tui.base import FramedScreen
from app.tui.cells import pct, spark
from app.tui.export import export_table
from app.tui.modals import ExportScreen
from app.tui.recording import OpenRecording
from app.tui.table import Column, VirtualTable
from engine.analysis.dead import is_relative, primary_is_tau0, rule_short
from engine.tables import Table

COLUMNS = [Column("layer", "layer", 5), Column("dead", "dead %", 6), Column("alive", "alive freq", 10),
           Column("tok", "tok det", 7), Column("big", "2g det", 6), Column("tri", "3g det", 6),
           Column("pos", "positional", 0), Column("supp", "suppress", 8)]
POS_SHORT = {"oscillatory": "osc", "both_extremes": "both", "one_extreme": "one", "other": "other"}
CHARTS = (("dead %", "dead_pct"), ("alive freq", "alive_freq"), ("token det", "token_detectors"),
          ("positional", "positional"))


def columns_for(meta: dict) -> list[Column]:
    """COLUMNS, with dead labelled by its threshold: beside a stricter rule than the paper's (tau 0),
    the paper's dead ("dead τ=0", never activated) too, and a relative rule's per-layer tau_l."""
    if primary_is_tau0(meta):
        return COLUMNS
    rule = [Column("tau", "τ_l", 6)] if is_relative(meta) else []
    dead = [Column("dead", f"dead {'τ_l' if is_relative(meta) else rule_short(meta)}", 8),
            Column("dead0", "dead τ=0", 8)]
    return [COLUMNS[0], *rule, *dead, *COLUMNS[2:]]


def charts_for(meta: dict) -> tuple:
    if primary_is_tau0(meta):
        return CHARTS
    return ((f"dead {'τ_l' if is_relative(meta) else rule_short(meta)}", "dead_pct"), *CHARTS[1:])


class LayersScreen(FramedScreen):
    HELP_TITLE = "Layers: per-layer figures of one recording"
    BINDINGS = FramedScreen.BINDINGS + [
        Binding("enter", "open", "neurons"), Binding("a", "all", "all neurons"), Binding("e", "export", "export"),
        Binding("n", "npl", "NPL"), Binding("A", "analyze", "analyze"),
    ]
    DEFAULT_CSS = FramedScreen.DEFAULT_CSS + "LayersScreen #charts { height: auto; max-height: 5; }"

    def __init__(self, rec: OpenRecording):
        super().__init__()
        self.rec = rec
        self.figures = rec.index.per_layer()

    def compose(self) -> ComposeResult:
        yield from self.frame_top()
        yield VirtualTable(columns_for(self.rec.meta), id="layers")
        yield Static(id="charts")
        yield from self.frame_bottom()

    def rebind(self, rec: OpenRecording) -> None:
        self.rec, self.figures = rec, rec.index.per_layer()
        self.on_mount()

    def on_mount(self) -> None:
        missing = [name for name, ok in self.rec.index.analyses.items() if not ok]
        note = f" · not analyzed yet ({', '.join(missing)}): A runs the analyses" if missing else ""
        if self.rec.index.pos_note:  # "too few sequences per position (N) to call positional neurons"
            note += f" · {self.rec.index.pos_note.split(':')[0]}"
        self.set_header(self.rec.title(), self.rec.status, f"Recordings > {self.rec.path.name} > Layers{note}")
        table = self.query_one(VirtualTable)
        table.show(len(self.figures["layer"]), self._cell, cursor=table.cursor)
        table.focus()
        self.call_after_refresh(self._charts)

    def on_resize(self) -> None:
        self._charts()

    def _charts(self) -> None:
        width = max(self.app.size.width - 14, 10)
        text = Text()
        charts = charts_for(self.rec.meta)
        for i, (label, key) in enumerate(charts):
            text.append(f" {label:>11} ", style="bold")
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
            return f"{f['dead_pct'][i]:.1f}"
        if key == "dead0":
            return f"{f['dead_tau0_pct'][i]:.1f}"
        if key == "tau":
            return f"{f['tau'][i]:.3g}"
        if key == "alive":
            return f"{pct(float(f['alive_freq'][i]), 2)} %"
        if key in ("tok", "big", "tri"):
            name = {"tok": "token_detectors", "big": "bigram_detectors", "tri": "trigram_detectors"}[key]
            return str(f[name][i]) if ngram and self.rec.index.analyses["ngrams"] else "-"
        if key == "pos":
            if not self.rec.index.analyses["positional"]:
                return "-"
            if self.rec.index.pos_note:
                return "- (too few seqs)"
            kinds = [f"{f[f'pos_{k}'][i]} {s}" for k, s in POS_SHORT.items() if f[f"pos_{k}"][i]]
            return f"{f['positional'][i]}" + (f" ({', '.join(kinds)})" if kinds else "")
        if key == "supp":
            value = float(f["suppress_frac"][i])
            return "-" if value != value else f"{pct(value, 0)} %"
        return ""

    def action_open(self) -> None:
        from app.tui.neurons import NeuronsScreen

        table = self.query_one(VirtualTable)
        if table.count:
            self.app.push_screen(NeuronsScreen(self.rec, int(self.figures["layer"][table.cursor])))

    def on_virtual_table_chosen(self, event: VirtualTable.Chosen) -> None:
        self.action_open()

    def action_all(self) -> None:
        from app.tui.neurons import NeuronsScreen

        self.app.push_screen(NeuronsScreen(self.rec, None))

    def action_npl(self) -> None:
        from app.tui.npl import NplScreen

        self.app.push_screen(NplScreen(self.rec))

    def action_analyze(self) -> None:
        self.app.start_analysis(self.rec.path)

    def action_export(self) -> None:
        figures = self.figures

        def done(choice):
            if choice is not None:
                export_table(self.app, lambda: Table(figures), *choice)
        self.app.push_screen(ExportScreen("layer table", len(figures["layer"]),
                                          self.app.export_dir / (self.rec.path.with_suffix("").name + "-layers")),
                             done)

