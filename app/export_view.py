"""`ffnscope export`: the neuron or layer table, filtered, to a file."""
from __future__ import annotations

from ffnscope.cache import analysis_store as store
from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore.tables import layer_table, neuron_table
from ffnscope.engine.analysis.job import POSITIONAL_LIMIT
from ffnscope.engine.analysis.positional import stored_note
from ffnscope.engine.record.meta import parse_layers
from ffnscope.engine.safe_text import printable
from ffnscope.engine.table.export import check_out, export
from ffnscope.engine.table.filter import filter_rows


def where_clause(args) -> str | None:
    """--dead / --detector / --positional as conditions, joined with --where."""
    parts = [f"({args.where})"] if args.where else []
    if args.dead:
        parts.append("dead_tau0" if args.dead == "tau0" else "dead")
    if args.detector:
        parts.append(f"{args.detector}_detector")
    if args.positional:
        parts.append("positional" if args.positional == "any" else f"positional and pos_type == {args.positional!r}")
    return " and ".join(parts) or None


def run_export(args) -> int:
    check_out(args.out, args.force, [args.file])  # before the recording is read
    with CacheReader(args.file, "exporting from it") as reader:
        pos = store.read_unchecked(reader, "positional", POSITIONAL_LIMIT)
        pos_note = stored_note(pos) if pos is not None else ""  # too few sequences per position
        layers = parse_layers(args.layers, reader.provenance.model.n_layers, "--layers")
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
    print(printable(f"wrote {len(table):,} rows to {args.out}"))
    if pos_note:
        print(printable(f"note: {pos_note}"))
    return 0
