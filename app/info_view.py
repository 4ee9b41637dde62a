"""`ffnscope info`: what a cache holds and how its layers fire."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ffnscope.app.console import console as make_console
from ffnscope.app.safe_text import plain
from ffnscope.cache import analysis_store as store
from ffnscope.cache.provenance import ModelInfo, RecordingInfo
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.dead import (PAPER_DEAD, dead_label, describe_rule, firing_by_layer, primary_is_tau0,
                                           rule_short)
from ffnscope.engine.analysis.ngrams import skip_status
from ffnscope.engine.analysis.job import POSITIONAL_LIMIT
from ffnscope.engine.analysis.positional import call_limit, stored_note


def layer_table(reader: CacheReader) -> Table:
    rec = reader.provenance.recording
    relative, paper = rec.is_relative, primary_is_tau0(rec)
    # every text from the cache is untrusted: plain() escapes control characters and is never markup
    table = Table(title=plain(f"firing rule: {rec.firing_rule}"),
                  caption=plain(f"dead: {dead_label(rec)}" + ("" if paper else f"; dead τ=0: {PAPER_DEAD}; "
                                                               "g² of dead: their share of the layer's sum of g²")))
    table.add_column("layer", justify="right")
    if relative:
        table.add_column("τ_l", justify="right")
    table.add_column(plain("dead %" if paper else f"dead % {'τ_l' if relative else rule_short(rec)}"),
                     justify="right")
    if not paper:
        table.add_column("dead % τ=0 (paper)", justify="right")
    table.add_column("alive freq %", justify="right")
    if not paper:
        table.add_column("g² of dead %", justify="right")
    others = [t for t in rec.taus if t != 0.0 and (relative or t != rec.primary_tau)]
    for tau in others:
        table.add_column(f"dead % τ={tau:g}", justify="right", style="dim")
    for row in firing_by_layer(reader):
        cells = [str(row.layer)] + ([f"{row.tau:.4g}"] if relative else []) + [f"{100 * row.dead_primary:.1f}"]
        cells += [] if paper else [f"{100 * row.dead_tau0:.1f}"]
        cells += [_pct(row.alive_freq, 3)] + ([] if paper else [_pct(row.dead_sq_share, 2)])
        table.add_row(*cells, *(f"{100 * row.dead(t):.1f}" for t in others))
    return table


def _pct(share: float, digits: int) -> str:
    return "-" if share != share else f"{100 * share:.{digits}f}"  # NaN: nothing to measure it on


def _thresholds(rec: RecordingInfo) -> str:
    listed = ", ".join(f"{t:g}" for t in rec.taus)
    if rec.is_relative:
        return f"{listed}, and per layer the primary: {describe_rule(rec.tau_rule)}"
    return f"{listed}  (primary {rec.primary_tau:g})"


def _ngram_note(reader: CacheReader) -> str:
    """Which neurons have n-gram counts: the bound, the early-skip rule, and what was skipped."""
    rec = reader.provenance.recording
    bound, cap = rec.ngram_bound, rec.ngram_max_freq
    if bound is None:  # no n-gram layers, or recorded before the bound existed
        return "none" if cap == "auto" else f"neurons firing <= {cap:g} on the calibration sample"
    total = {"counted": 0, "proven": 0, "unproven": 0}
    for layer in rec.ngram_layers:
        counted = reader.ngram_counted(layer) if layer in reader.layers else None
        if counted is not None:
            for key, value in skip_status(counted, reader.primary_fire_count(layer), bound).items():
                total[key] += value
    limit = (f"every neuron that can be a detector: <= {bound['fires']:,} fires" if cap == "auto" else
             f"neurons firing <= {cap:g} (--ngram-max-freq); a detector fires <= {bound['fires']:,} times")
    return (f"{limit} ({100 * bound['freq']:.1f} % of tokens, from the data's most frequent n-grams); not counted: "
            f"{total['proven']:,} proven non-detectors, {total['unproven']:,} without proof (no verdict)")


def provenance(reader: CacheReader) -> Table:
    prov = reader.provenance
    model, data, rec = prov.model, prov.data, prov.recording
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    status = reader.status if reader.status == "complete" else \
        f"{reader.status} ({reader.shards_done}/{rec.n_shards} shards; finish with --resume)"
    sources = _listed([s.get("path") or s.get("kind", "?") for s in data.sources], "sources")
    lines = [
        ("file", str(reader.path)), ("status", status),
        ("model", f"{model.label} ({model.family}, {model.n_layers} layers, d_model {model.d_model}, "
                  f"d_ffn {model.d_ffn}, {model.activation}, {model.dtype})"),
        ("model spec", f"{_spec(model)}  fingerprint {model.fingerprint}"),
        ("tokens", f"{reader.n_tokens:,} in sequences of {data.seq_len}"
                   + (f" (part {rec.part[0]}/{rec.part[1]})" if rec.part != (1, 1) else "")
                   + _positional_note(reader)),
        ("data", f"{sources}  fingerprint {data.fingerprint[:16]}  domains {_listed(data.domain_names, 'domains')}"),
        ("thresholds", _thresholds(rec)),
        ("n-gram layers", _ranges(list(rec.ngram_layers)) + f"  ({_ngram_note(reader)})"),
        ("recorded", f"{prov.created} by ffnscope {prov.tool_version}, schema v{prov.schema_version}"),
    ]
    for key, value in lines:
        grid.add_row(key, plain(value))  # file and model names: control characters escaped, never markup
    return grid


def _spec(model: ModelInfo) -> str:
    """The model spec as the user gave it, and where it was found when that was a relative path."""
    given, spec = model.spec_given, model.spec
    return given if given == spec else f"{given} ({spec})"


def _positional_note(reader: CacheReader) -> str:
    """" · too few sequences per position (N) to call positional neurons ..." or "": the stored
    positional analysis' verdict, else the default parameters' (engine.analysis.positional.call_limit)."""
    pos = store.read_unchecked(reader, "positional", POSITIONAL_LIMIT)
    if pos is not None and "too_few" in pos:
        note = stored_note(pos)
    else:
        seq_len = reader.provenance.data.seq_len
        n_seqs = reader.n_tokens // seq_len
        note = call_limit(n_seqs, seq_len).message() if n_seqs > 0 else ""
    return f" · {note}" if note else ""


def _listed(items: list[str], what: str, limit: int = 600) -> str:
    """Items joined, cut after `limit` characters with their number: a cache may list thousands of
    sources, and one line of megabytes would take the terminal seconds to lay out."""
    text = ", ".join(items)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(items):,} {what})"


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    out, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ",".join(out)


def print_info(path: Path, console: Console | None = None) -> None:
    console = console or make_console()
    with CacheReader(path, "reading it") as reader:
        console.print(provenance(reader))
        console.print(layer_table(reader))
