"""`ffnscope report FILE...`: the paper's figures in the terminal, as tables and plotext charts.
Several recordings (models of different sizes or families) are overlaid against relative depth,
one series per model, as in the paper's figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from ffnscope.app.charts import line_chart, position_chart
from ffnscope.app.console import console as make_console
from ffnscope.app.safe_text import plain, printable
from ffnscope.cache import analysis_store as store
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.dead import PAPER_DEAD, dead_label, primary_is_tau0, rule_short
from ffnscope.engine.analysis.ngrams import COVERAGE_BUCKETS, support_rule
from ffnscope.engine.explore.tables import layer_table
from ffnscope.engine.analysis.positional import KINDS, stored_note


def _label(reader: CacheReader) -> str:
    model = reader.provenance.model  # label: the name, and a dequantized GGUF's quantization
    return printable(f"{model.label} ({model.family}, {model.n_layers}L)")


def _shown(value, scale: float = 1, digits: int = 0) -> str:
    """A layer table cell; None (nothing measured it, e.g. too few sequences per position) as "-"."""
    return "-" if value is None else f"{scale * value:.{digits}f}"


def _points(x: list, y: list, scale: float = 1) -> tuple[list, list]:
    """A chart series without the layers where the figure is not known (None): no point, never 0."""
    known = [(a, scale * b) for a, b in zip(x, y) if b is not None]
    return [a for a, _ in known], [b for _, b in known]


def _bucket_table(reader: CacheReader, ngrams: dict) -> RichTable:
    table = RichTable(title=Text(f"{_label(reader)}: alive neurons by number of tokens covering 95 % of their "
                                 "fires (Fig. 2)"))
    table.add_column("layer", justify="right")
    for lo, hi in COVERAGE_BUCKETS:
        table.add_column(f"{lo}-{hi}" if hi else f"{lo}+", justify="right")
    for layer, hist in zip(ngrams["layers"], ngrams["n1/coverage_hist"]):
        table.add_row(str(layer), *(str(v) for v in hist))
    return table


# the two readings of "suppresses its triggers" (engine.analysis.suppression), named under the summary
SUPPRESS_CAPTION = Text("supp % logit: token detectors whose update gives their triggers a negative mean logit "
                        "(the paper's reading, Sec. 4.4)\nsupp % z: token detectors whose update pushes their "
                        "triggers below the vocabulary's mean (z-score < 0)")


def _summary_table(reader: CacheReader, rows) -> RichTable:
    rec = reader.provenance.recording
    paper, relative = primary_is_tau0(rec), rec.is_relative
    caption = ([] if paper else [plain(f"dead: {dead_label(rec)}; dead τ=0: {PAPER_DEAD}")]) + [SUPPRESS_CAPTION]
    caption.insert(0, Text(support_rule(_rule(rows))))  # the rule behind tok det, 2g det, 3g det
    table = RichTable(title=Text(f"{_label(reader)} · {reader.n_tokens:,} tokens · {printable(rec.firing_rule)}"),
                      caption=Text("\n").join(caption), box=box.SIMPLE_HEAD, pad_edge=False)  # fits 80 columns
    dead_headers = ["dead %"] if paper else [f"dead % {'τ_l' if relative else rule_short(rec)}", "dead % τ=0"]
    for header in ("layer", *(["τ_l"] if relative else []), *dead_headers, "alive %", "tok det", "2g det", "3g det",
                   "supp % logit", "supp % z", "positional"):
        # headers on two lines, so the table fits 80 columns without squeezing a column ("pos…")
        table.add_column(Text(printable(header).replace(" ", "\n", 1)), justify="right",
                         min_width=len(header) if header == "positional" else None)
    for row in rows.rows():
        ngram = row["ngram_layer"]
        dead = [f"{100 * row['dead_frac']:.1f}"] + ([] if paper else [f"{100 * row['dead_tau0_frac']:.1f}"])
        table.add_row(str(row["layer"]), *([f"{row['tau']:.4g}"] if relative else []), *dead,
                      _shown(row["alive_freq"], 100, 3),
                      *(str(row[k]) if ngram else "-" for k in ("token_detectors", "bigram_detectors",
                                                                "trigram_detectors")),
                      *(_shown(row[k], 100) for k in ("suppress_frac_logit", "suppress_frac_z")),
                      _shown(row["positional"]))
    return table


def _rule(rows) -> int | None:
    """The support rule (ngrams.min_occurrences) of a recording's detector counts: one per analysis."""
    return next((v for v in rows["min_occurrences"].tolist() if v is not None), None)


def _ensemble_table(reader: CacheReader, rows) -> RichTable:
    table = RichTable(title=Text(f"{_label(reader)}: detected tokens per layer (Fig. 3b, 4) · "
                                 f"{support_rule(_rule(rows))}"))
    for header in ("layer", "detected", "new overall", "new vs previous", "cumulative"):
        table.add_column(header, justify="right")
    for row in rows.rows():
        if row["ngram_layer"]:
            table.add_row(*(str(row[k]) for k in ("layer", "detected_tokens", "new_tokens", "new_vs_previous",
                                                  "cumulative_tokens")))
    return table


def _positional_table(reader: CacheReader, rows, pos: dict) -> RichTable:
    note = stored_note(pos)  # too few sequences per position to call any
    table = RichTable(title=Text(f"{_label(reader)}: positional neurons by type (Fig. 8)"),
                      caption=plain(note) if note else None)
    for header in ("layer", "positional", *KINDS, "strong"):
        table.add_column(header, justify="right")
    for row in rows.rows():
        table.add_row(str(row["layer"]), _shown(row["positional"]), *(_shown(row[f"pos_{k}"]) for k in KINDS),
                      _shown(row["pos_strong"]))
    return table


def _position_plots(reader: CacheReader, pos: dict, count: int, width: int) -> list[Text]:
    """Firing frequency by position of the strongest positional neurons (Fig. 7, 9)."""
    mi = np.where(pos["positional"], pos["mi"], -1.0)
    flat = np.argsort(-mi, axis=None)[:count]
    n_seqs = reader.n_tokens // reader.provenance.data.seq_len
    out = []
    for index in flat:
        row, neuron = np.unravel_index(index, mi.shape)
        if mi[row, neuron] <= 0:
            break
        layer = int(pos["layers"][row])
        freq = reader.array(layer, "pos_fire", (slice(None), int(neuron))) / max(n_seqs, 1)
        kind = KINDS[pos["kind"][row, neuron] - 1]
        strength = "strong" if pos["strong"][row, neuron] else "weak"
        title = f"layer {layer} neuron {neuron}: {kind} ({strength}), MI {mi[row, neuron]:.3f}"
        out.append(position_chart(freq, title, min(width, 100)))
    return out


def print_report(paths: list[Path], console: Console | None = None, position_plots: int = 3) -> None:
    console = console or make_console()
    width = console.width
    readers = [CacheReader(p, "reporting on it") for p in paths]
    try:
        rules: set[int | None] = set()  # the detector counts' support rules (ngrams.min_occurrences)
        series: dict[str, dict] = {k: {} for k in ("dead", "dead0", "freq", "det", "tokens", "cum", "supp", "pos")}
        for reader in readers:
            rows = layer_table(reader)  # UserError unless every analysis is stored and current
            results = {name: store.read_group(reader, name) for name in ("ngrams", "positional")}
            for table in (_summary_table(reader, rows), _bucket_table(reader, results["ngrams"]),
                          _ensemble_table(reader, rows), _positional_table(reader, rows, results["positional"])):
                console.print(table)
            label = _label(reader)
            depth = rows["rel_depth"].tolist()
            ngram = rows["ngram_layer"]
            series["dead"][f"{label} {printable(rule_short(reader.provenance.recording))}"] = (depth,
                                                                               (100 * rows["dead_frac"]).tolist())
            series["dead0"][label] = (depth, (100 * rows["dead_tau0_frac"]).tolist())
            series["freq"][label] = _points(depth, rows["alive_freq"].tolist(), 100)
            series["pos"][label] = _points(depth, rows["positional"].tolist())
            d = rows["rel_depth"][ngram].tolist()
            series["det"][label] = (d, rows["token_detectors"][ngram].tolist())
            rules.add(_rule(rows))
            series["tokens"][label] = (d, rows["detected_tokens"][ngram].tolist())
            series["cum"][label] = (d, rows["cumulative_tokens"][ngram].tolist())
            # the paper's reading; layers with no detector: no point
            series["supp"][label] = _points(d, rows["suppress_frac_logit"][ngram].tolist(), 100)
        paper = all(primary_is_tau0(r.provenance.recording) for r in readers)
        charts = [("dead neurons (Fig. 1a): never activated, τ=0 (the paper's dead)" if paper else
                   "dead neurons (Fig. 1a) at each recording's firing rule: never above its τ", "dead", "%"),
                  *([] if paper else [("never activated, τ=0: the paper's dead (Fig. 1a)", "dead0", "%")]),
                  ("mean firing frequency of alive neurons (Fig. 1b)", "freq", "%"),
                  ("token-detecting neurons (Fig. 3a)", "det", "neurons"),
                  ("detected tokens per layer (Fig. 3b, solid)", "tokens", "tokens"),
                  ("detected tokens, cumulative (Fig. 3b, dashed)", "cum", "tokens"),
                  ("detectors suppressing their triggers by raw logit (the paper's, Sec. 4.4)", "supp", "%"),
                  ("positional neurons (Fig. 8)", "pos", "neurons")]
        for title, key, unit in charts:
            console.print(line_chart(title, series[key], min(width, 100), 16, "layer (relative depth)", unit))
            if key == "det":  # the support rule behind the counts (a chart title that long is not drawn)
                console.print(Text("; ".join(support_rule(r) for r in sorted(rules, key=str))))
        for reader in readers:
            pos = store.read_group(reader, "positional")
            if stored_note(pos):
                console.print(Text(f"{_label(reader)}: {printable(stored_note(pos))}"))
            for plot in _position_plots(reader, pos, position_plots, width):
                console.print(plot)
    finally:
        for reader in readers:
            reader.close()
