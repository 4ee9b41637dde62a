"""`ffnscope export`: the neuron or layer table, filtered, to a file."""
from __future__ import annotations

from cache.errors import UserError
from cache.reader import CacheReader
from engine.analysis.neuron_table import layer_table, neuron_table
from engine.meta import parse_layers
from engine.tables import export, filter_rows


def where_clause(args) -> str | None:
    """--dead / --detector / --positional as conditions, joined with --where."""
    parts = [f"({args.where})"] if args.where else []
    if args.dead:
        parts.append("dead")
    if args.detector:
        parts.append(f"{args.detector}_detector")
    if args.positional:
        parts.append("positional" if args.positional == "any" else f"positional and pos_type == {args.positional!r}")
    return " and ".join(parts) or None


def run_export(args) -> int:
    with CacheReader(args.file, "exporting from it") as reader:
        layers = parse_layers(args.layers, reader.meta["model"]["n_layers"], "--layers")
        if args.table == "neurons":
            table = neuron_table(reader, layers)
        else:
            if args.dead or args.detector or args.positional:
                raise UserError("--dead, --detector and --positional filter neurons; use --where on the layer table")
            table = layer_table(reader)
            if layers is not None:
                table = table.take(filter_rows(table, f"layer in {tuple(layers) + (-1,)}"))
    expr = where_clause(args)
    if expr:
        table = table.take(filter_rows(table, expr))
    export(table, args.out, args.format)
    print(f"wrote {len(table):,} rows to {args.out}")
    return 0
