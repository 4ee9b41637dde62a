"""`ffnscope info`: what a cache holds and how its layers fire."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from cache.reader import CacheReader
from engine.analysis.dead import firing_by_layer


def layer_table(reader: CacheReader) -> Table:
    rec = reader.meta["recording"]
    primary = rec["primary_tau"]
    table = Table(title=f"firing rule: {rec['firing_rule']}  (dead % at other thresholds right)")
    table.add_column("layer", justify="right")
    table.add_column("dead %", justify="right")
    table.add_column("alive freq %", justify="right")
    others = [t for t in rec["taus"] if t != primary]
    for tau in others:
        table.add_column(f"dead % τ={tau:g}", justify="right", style="dim")
    for row in firing_by_layer(reader):
        table.add_row(str(row.layer), f"{100 * row.dead(primary):.1f}", f"{100 * row.alive_freq:.3f}",
                      *(f"{100 * row.dead(t):.1f}" for t in others))
    return table


def provenance(reader: CacheReader) -> Table:
    meta = reader.meta
    model, data, rec = meta["model"], meta["data"], meta["recording"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    status = reader.status if reader.status == "complete" else \
        f"{reader.status} ({reader.shards_done}/{rec['n_shards']} shards; finish with --resume)"
    sources = ", ".join(s.get("path") or s.get("kind", "?") for s in data["sources"])
    lines = [
        ("file", str(reader.path)), ("status", status),
        ("model", f"{model['name']} ({model['family']}, {model['n_layers']} layers, d_model {model['d_model']}, "
                  f"d_ffn {model['d_ffn']}, {model['activation']}, {model['dtype']})"),
        ("model spec", f"{model['spec']}  fingerprint {model['fingerprint']}"),
        ("tokens", f"{reader.n_tokens:,} in sequences of {data['seq_len']}"
                   + (f" (part {rec['part'][0]}/{rec['part'][1]})" if rec["part"] != [1, 1] else "")),
        ("data", f"{sources}  fingerprint {data['fingerprint'][:16]}  domains {', '.join(data['domain_names'])}"),
        ("thresholds", ", ".join(f"{t:g}" for t in rec["taus"]) + f"  (primary {rec['primary_tau']:g})"),
        ("n-gram layers", _ranges(rec["ngram_layers"]) + f"  (neurons firing <= {rec['ngram_max_freq']:g})"),
        ("recorded", f"{meta['created']} by ffnscope {meta['tool_version']}, schema v{meta['schema_version']}"),
    ]
    for key, value in lines:
        grid.add_row(key, Text(value))  # Text: file and model names are never read as markup
    return grid


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
    console = console or Console()
    with CacheReader(path, "reading it") as reader:
        console.print(provenance(reader))
        console.print(layer_table(reader))
