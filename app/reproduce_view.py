"""`ffnscope reproduce A.h5 B.h5`: the split-half comparison (engine.explore.reproduce) as a table in
the terminal, or JSON for scripts; with --into, stored in the merge of the two."""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ffnscope.app.console import console as make_console
from ffnscope.app.safe_text import plain
from ffnscope.cache.errors import UserError
from ffnscope.engine.explore.reproduce import Category, Outcome, reproduce


def run_reproduce(args) -> int:
    missing = [str(p) for p in [*args.files, *([args.into] if args.into else [])] if not Path(p).is_file()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}; give two recordings (.h5)"
                        + (" and their merge" if args.into else ""))
    outcome = reproduce(*args.files, into=args.into)
    if args.format == "json":
        print(json.dumps(outcome.as_dict(), indent=1))
    else:
        show(outcome)
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def _notes(c: Category) -> list[str]:
    """What the table's counts leave out, one line each."""
    if not c.analysed:
        return [f"{c.label}: not analysed in both (analysed before this reading existed); run `ffnscope analyze` "
                "on both"]
    notes = []
    if c.other:
        notes.append(f"{c.label}: {c.other:,} in both halves with other triggers (not found again)")
    if c.same_type is not None and c.both:
        notes.append(f"{c.label}: {c.same_type:,} of the {c.both:,} found again have the same type")
    if c.compared:
        notes.append(f"{c.label}: verdicts agree on {c.agree:,} of the {c.compared:,} token detectors of both "
                     "halves")
    return notes


def show(outcome: Outcome) -> None:
    console = make_console()
    head = (f"A = {outcome.path_a} (part {outcome.parts[0]}), B = {outcome.path_b} (part {outcome.parts[1]}); "
            f"{len(outcome.comparison.layer):,} neurons")
    console.print(plain(head), highlight=False)
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0),
                  caption=plain("found again: in both halves (a detector with the same triggers); left out: found "
                                "in one half, undecided in the other"))
    table.add_column("finding", no_wrap=True)
    for title in ("A", "B", "A&B", "A&B/A %", "A&B/B %", "Jaccard %", "left out"):
        table.add_column(title, justify="right", no_wrap=True)
    notes = []
    for c in outcome.comparison.summary():
        table.add_row(plain(c.label), f"{c.a:,}", f"{c.b:,}", f"{c.both:,}", _pct(c.a_share), _pct(c.b_share),
                      _pct(c.jaccard), f"{c.left_out:,}")
        notes += _notes(c)
    console.print(table)
    for note in notes:
        console.print(plain(note), highlight=False)
    counts = outcome.as_dict()["reproduced"]
    console.print(plain(f"neurons with findings: {counts['true']:,} reproduced, {counts['false']:,} not"),
                  highlight=False)
    for note in outcome.notes:
        console.print(plain(f"note: {note}"), highlight=False)
    if outcome.into is not None:
        console.print(plain(f"stored in {outcome.into}: column `reproduced` of its neuron table (exports, --where "
                            "reproduced, the app's neuron filters)"), highlight=False)
