"""Neuron detail: statistics, triggers with their share of the firings, promoted and suppressed
tokens, firing frequency by position (Fig. 7), and the strongest contexts with the token marked.
`[` and `]` step through the rows of the neurons list it was opened from."""
from __future__ import annotations

import numpy as np
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from ffnscope.app.charts import position_chart
from ffnscope.app.safe_text import printable
from ffnscope.app.tui.base import HELP_KEY, FramedScreen
from ffnscope.app.tui.cells import num, pct, token, tokens, unknown, yes_no
from ffnscope.app.tui.recording import OpenRecording
from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import sidecar_path
from ffnscope.engine.analysis.ngrams import support_rule
from ffnscope.engine.explore.detail import NeuronDetail, neuron_detail

NGRAM_NAMES = {1: "tokens", 2: "bigrams", 3: "trigrams"}


class DetailScreen(FramedScreen):
    HELP_TITLE = "Neuron detail"
    BINDINGS = FramedScreen.BINDINGS + [
        Binding("right_square_bracket", "step(1)", "next", key_display="]"),
        Binding("left_square_bracket", "step(-1)", "previous", key_display="["),
        Binding("j,down", "scroll(1)", "scroll down", show=False), Binding("k,up", "scroll(-1)", "scroll up", show=False),
        Binding("escape", "back", "back", tooltip="back to the neurons list"), HELP_KEY,
    ]
    EXTRA_HELP = [("j k ↑ ↓", "scroll")]
    DEFAULT_CSS = FramedScreen.DEFAULT_CSS + """
    DetailScreen VerticalScroll { height: 1fr; padding: 0 1; }
    DetailScreen .section { height: auto; margin-bottom: 1; }
    """

    def __init__(self, rec: OpenRecording, rows: np.ndarray, position: int):
        super().__init__()
        self.rec, self.rows, self.position = rec, rows, position
        self.detail: NeuronDetail | None = None

    def compose(self) -> ComposeResult:
        yield from self.frame_top()
        with VerticalScroll():
            for name in ("summary", "plot", "triggers", "contexts"):
                yield Static(id=name, classes="section")
        yield from self.frame_bottom()

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()
        self.load()

    @property
    def row(self) -> int:
        return int(self.rows[self.position])

    def load(self) -> None:
        index = self.rec.index
        layer, neuron = int(index.cols["layer"][self.row]), int(index.cols["neuron"][self.row])
        self.set_header(self.rec.title(), self.rec.status,
                        f"Recordings > {self.rec.name} > Layer {layer} > Neuron {neuron} "
                        f"({self.position + 1:,} of {len(self.rows):,})")
        self._load(self.row)

    @work(thread=True, exclusive=True, group="detail")
    def _load(self, row: int) -> None:
        try:  # the index reads the detector evidence on first use: a damaged file says so here
            detail = neuron_detail(self.rec.reader, self.rec.index, row)
        except UserError as exc:
            self.app.call_from_thread(self.app.notify, printable(str(exc)), severity="error", markup=False)
            return
        width = max(self.app.size.width - 4, 30)
        seq_len = len(detail.pos_freq)
        chart = position_chart(detail.pos_freq, f"firing frequency by position (of {seq_len})", width, 12)
        self.app.call_from_thread(self._show, detail, chart)

    def _show(self, detail: NeuronDetail, chart: Text) -> None:
        cols = self.rec.index.cols
        if (detail.layer, detail.neuron) != (cols["layer"][self.row], cols["neuron"][self.row]):
            return  # a later [ or ] has moved on; its own load will show
        self.detail = detail
        self.query_one("#summary", Static).update(summary_text(detail, self._npl_reason()))
        self.query_one("#plot", Static).update(chart)
        self.query_one("#triggers", Static).update(triggers_text(detail))
        self.query_one("#contexts", Static).update(contexts_text(detail))

    def _npl_reason(self) -> str:
        """Why this recording's neurons have no NPL figures."""
        if self.rec.index.npl_note:  # a sidecar of another recording, or unreadable
            return printable(self.rec.index.npl_note.split(":")[0])
        if not sidecar_path(self.rec.path).exists():
            return NO_FIT
        return "no NPL map into this layer"

    def action_step(self, step: int) -> None:
        position = self.position + step
        if 0 <= position < len(self.rows):
            self.position = position
            self.load()

    def action_scroll(self, lines: int) -> None:
        self.query_one(VerticalScroll).scroll_relative(y=lines, animate=False)


def kind_text(detail: NeuronDetail) -> str:
    s = detail.stats
    kinds = [name for key, name in (("token_detector", "token detector"), ("bigram_detector", "bigram detector"),
                                    ("trigram_detector", "trigram detector")) if s.get(key)]
    if s.get("dead_tau0"):
        kinds.append("dead: never activated (the paper's dead)")
    elif s.get("dead"):
        kinds.append(f"dead above τ={s.get('tau', 0):.3g} (active below it; not the paper's dead)")
    if s.get("positional"):
        kinds.append(f"positional, {detail.pos_type.replace('_', ' ')} ({'strong' if s.get('pos_strong') else 'weak'})")
    if s.get("background"):
        kinds.append("background")
    return "; ".join(kinds) or "no special role found"


def _ngram_reason(s: dict) -> str:
    """Why an n-gram figure of this neuron is unknown."""
    if s.get("ngram_counted") is None:
        return "n-grams not counted in this layer"
    if s.get("ngram_counted") is False:
        return "n-grams not counted for this neuron"
    return "not analyzed"


def _known(value, reason: str, digits: int = 3) -> str:
    """A number, or "-" and why it is unknown."""
    return unknown(reason) if value is None or value != value else num(value, digits)


NO_FIT = "no NPL fit yet; n opens the NPL screen from the layers"


def summary_text(detail: NeuronDetail, npl_reason: str = NO_FIT) -> Text:
    """Every field has a value or "-" with the reason it is unknown; `npl_reason` says why the NPL
    figures are missing (the caller knows whether a fit exists)."""
    s = detail.stats
    out = Text()
    out.append(f"Layer {detail.layer} · neuron {detail.neuron} · ", style="bold")
    out.append(kind_text(detail), style="bold")
    note = s["pos_note"].split(":")[0] if s.get("pos_note") else ""  # too few sequences per position
    mi = s.get("pos_mi")
    out.append(f" · MI {unknown(note or 'positional analysis not run')}\n" if mi is None or mi != mi else
               f" · MI {num(mi, 3)}" + (f" ({note})\n" if note else "\n"))
    out.append(f"fires {s['fire_count']:,} times above τ={s.get('tau', 0):.3g} ({pct(s['fire_freq'], 3)} % of tokens)"
               f" · g mean {num(s['g_mean'], 3)}"
               f" std {num(s['g_std'], 3)} max {num(s['g_max'], 3)}\n")
    coverage = s.get("unigram_coverage")
    out.append(f"coverage number {unknown(_ngram_reason(s)) if coverage is None else coverage}\n")
    suppresses = s.get("suppresses_logit")
    if suppresses is None:
        reason = _ngram_reason(s) if not s.get("ngram_counted") else \
            "not a token detector" if not s.get("token_detector") else "not analyzed"
        out.append(f"suppresses its triggers: {unknown(reason)}")
    else:
        # both readings (engine.analysis.suppression), each named: the paper's first
        out.append(f"suppresses its triggers: {yes_no(suppresses)} by raw logit, the paper's reading (trigger logit "
                   f"{_known(s.get('trigger_logit'), 'not computed', 3)}) · {yes_no(s.get('suppresses_z'))} vs the "
                   f"vocabulary (z {_known(s.get('trigger_logit_z'), 'not computed', 2)})"
                   f" · g at triggers {_known(s.get('trigger_g'), 'not computed', 2)}")
    if s.get("ngram_counted") is None:
        out.append("\nn-grams: not counted in this layer")
    elif s.get("ngram_counted") is False:
        bound = s.get("ngram_bound")
        if bound is not None and s["fire_count"] > bound:
            out.append(f"\nn-grams: not counted: fires more often than any detector can ({bound:,} fires)")
        else:
            out.append("\nn-grams: not counted (left out by the calibration sample or --ngram-max-freq): no verdict")
    if detail.pos_ranges:
        out.append(f"\nindicates positions {', '.join(detail.pos_ranges)}")
    npl = [(label, s.get(key)) for key, label in (("npl_pearson", "NPL Pearson r"), ("npl_l2", "NPL L2 error"))]
    if all(value is None for _, value in npl):
        out.append(f"\nNPL predictability: {unknown(npl_reason)}")
    else:
        out.append("\n" + " · ".join(f"{label} {_known(value, 'no map into this layer')}" for label, value in npl))
        background = s.get("background")
        out.append(f" · background {unknown('functional job not run') if background is None else yes_no(background)}")
    return out


def triggers_text(detail: NeuronDetail) -> Text:
    out = Text()
    for n in (1, 2, 3):
        items = detail.triggers[n]
        if items:
            out.append(evidence_line(detail, n) + "\n")
            counts = detail.trigger_counts.get(n)
            if counts:  # fires on the trigger / its occurrences: 1/1 is one context, not a detector's pattern
                out.append(f"trigger {NGRAM_NAMES[n]} (fires/occurrences): ", style="bold")
                out.append(", ".join(f"{token(text)} {fires:,}/{seen:,}" for (text, _), (fires, seen)
                                     in zip(items[:20], counts)))
            else:
                out.append(f"trigger {NGRAM_NAMES[n]} (share of firings): ", style="bold")
                out.append(", ".join(f"{token(text)} {100 * share:.0f}%" for text, share in items[:20]))
            out.append("\n")
    if not any(detail.triggers.values()):
        out.append("triggers: none found", style="bold")
        out.append("\n")
    else:  # the support rule behind these verdicts
        out.append(support_rule(detail.stats.get("min_occurrences")) + "\n", style="dim")
    out.append("top promoted:   ", style="bold")
    reason = "not a token detector" if not detail.stats.get("token_detector") else "none stored"
    out.append(tokens(detail.promoted, 10) or unknown(reason))
    out.append("\ntop suppressed: ", style="bold")
    out.append(tokens(detail.suppressed, 10) or unknown(reason))
    return out


def evidence_line(detail: NeuronDetail, n: int) -> str:
    """What an n-gram detector verdict rests on."""
    s, kind = detail.stats, NGRAM_NAMES[n][:-1]
    fires, seen = s.get(f"{kind}_trigger_fires"), s.get(f"{kind}_trigger_occurrences")
    if fires is None or seen is None:
        return f"{kind} detector: evidence not stored (analyzed before it; A analyzes again)"
    return (f"{kind} detector: {fires:,} {'fire' if fires == 1 else 'fires'} on triggers seen {seen:,} "
            f"{'time' if seen == 1 else 'times'}, {pct(s.get(f'{kind}_trigger_share'), 0)} % of its fires")


def contexts_text(detail: NeuronDetail) -> Text:
    out = Text()
    if detail.gated:  # ranked by act(gate), what firing thresholds; g = act(gate) * up, signed
        out.append(f"top activating contexts ({len(detail.contexts)}), by act(gate); g signed\n", style="bold")
    else:
        out.append(f"top activating contexts ({len(detail.contexts)})\n", style="bold")
    for c in detail.contexts:
        out.append(f"{c.value:8.3f} g {c.g:+8.3f}  " if detail.gated else f"{c.value:8.3f}  ")
        out.append(printable("".join(c.before)))
        out.append(printable(c.token), style="reverse bold")
        out.append(printable("".join(c.after)))
        out.append(f"   (seq {c.sequence}, pos {c.position})\n", style="dim")
    return out
