"""Compare: several recordings side by side, per-layer figures against relative depth, one series
per model (the paper's view across model sizes), and a summary table."""
from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.table import Table as RichTable
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from ffnscope.app.charts import line_chart
from ffnscope.app.safe_text import printable
from ffnscope.app.tui.base import HELP_KEY, FramedScreen
from ffnscope.app.tui.recording import OpenRecording
from ffnscope.engine.analysis.dead import rule_short

FIGURES = (("dead neurons, % (Fig. 1a): never above each recording's τ", "dead_frac", 100.0),
           ("never activated, % (τ=0: the paper's dead)", "dead_tau0_frac", 100.0),
           ("alive firing frequency, % (Fig. 1b)", "alive_freq", 100.0),
           ("token detectors (Fig. 3a)", "token_detectors", 1.0), ("positional neurons (Fig. 8)", "positional", 1.0))


def _total(counts: np.ndarray) -> str:
    """A count over the layers that know it; "-" where none does (e.g. too few sequences to call positional)."""
    known = counts[~np.isnan(counts)]
    return str(int(known.sum())) if known.size else "-"


def _rule_mark(rec: OpenRecording) -> str:
    """" ≥N" after a detector count: its triggers were seen at least N times (ngrams.min_occurrences)."""
    rule = rec.index.min_occurrences
    return "" if rule is None else f" ≥{rule}"


class CompareScreen(FramedScreen):
    HELP_TITLE = "Compare recordings against relative depth"
    BINDINGS = FramedScreen.BINDINGS + [Binding("j,down", "scroll(2)", "scroll down", show=False),
                                        Binding("k,up", "scroll(-2)", "scroll up", show=False),
                                        Binding("escape", "back", "back"), HELP_KEY]
    DEFAULT_CSS = FramedScreen.DEFAULT_CSS + "CompareScreen VerticalScroll { height: 1fr; padding: 0 1; }"

    def __init__(self, recs: list[OpenRecording]):
        super().__init__()
        self.recs = recs

    def compose(self) -> ComposeResult:
        yield from self.frame_top()
        with VerticalScroll():
            yield Static(id="summary")
            for _, key, _ in FIGURES:
                yield Static(id=key)
        yield from self.frame_bottom()

    def on_mount(self) -> None:
        self.set_header(f"comparing {len(self.recs)} recordings", "", "Recordings > Compare")
        self.query_one(VerticalScroll).focus()
        self.draw()

    def on_resize(self) -> None:
        self.draw()

    def _label(self, rec: OpenRecording) -> str:
        """Unique per recording (two recordings of one model are two series)."""
        return f"{printable(rec.path.stem)}: {rec.model_name} ({len(rec.index.layers)}L)"

    def draw(self) -> None:
        figures = [(rec, rec.index.per_layer(dead_sq=False)) for rec in self.recs]
        # numbered rows under a legend of whole names: the table fits 80 columns however long the names
        legend = Text()
        for number, rec in enumerate(self.recs, start=1):
            legend.append(f"{number:>2} ", style="bold")
            legend.append(self._label(rec) + "\n")
        summary = RichTable(box=None, header_style="bold")
        for title in ("#", "rule", "layers", "d_ffn", "tokens", "dead %", "dead τ=0 %", "1g det", "positional"):
            summary.add_column(title, justify="right", no_wrap=True)
        for number, (rec, f) in enumerate(figures, start=1):
            summary.add_row(str(number), rule_short(rec.prov.recording), str(len(rec.index.layers)),
                            f"{rec.index.d_ffn:,}", f"{rec.n_tokens:,}", f"{100 * float(np.mean(f['dead_frac'])):.1f}",
                            f"{100 * float(np.mean(f['dead_tau0_frac'])):.1f}",
                            _total(f["token_detectors"]) + _rule_mark(rec), _total(f["positional"]))
        # the support rule behind each count (engine.analysis.ngrams.support_rule)
        rules = Text("1g det ≥N: triggers seen >= N times (paper: >= 1)", style="dim")
        self.query_one("#summary", Static).update(Group(legend, summary, rules))
        width = max(self.app.size.width - 4, 30)
        for title, key, scale in FIGURES:
            series = {}
            for rec, f in figures:
                n_layers = rec.prov.model.n_layers
                depth = f["layer"] / max(n_layers - 1, 1)
                known = ~np.isnan(f[key].astype(float))  # NaN: not known there (no point), never 0
                series[self._label(rec)] = (depth[known].tolist(), (f[key][known] * scale).tolist())
            self.query_one(f"#{key}", Static).update(line_chart(title, series, width, 12, "relative depth"))

    def action_scroll(self, lines: int) -> None:
        self.query_one(VerticalScroll).scroll_relative(y=lines, animate=False)
