"""Exports started from a screen run in a thread worker and end with a notification, so a large
table never blocks a keypress."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ffnscope.app.safe_text import printable
from ffnscope.cache.errors import UserError
from ffnscope.engine.explore.index import NeuronIndex
from ffnscope.engine.explore.tables import NEURON_KINDS
from ffnscope.engine.table.table import Table
from ffnscope.engine.table.export import export


def export_neurons(app, index: NeuronIndex, rows: np.ndarray, fmt: str, path: Path) -> None:
    export_table(app, lambda: Table(index.table_columns(rows), kinds=NEURON_KINDS), fmt, path)


def export_table(app, build, fmt: str, path: Path) -> None:
    """`build()` makes the Table in the worker; the file is written there too."""
    def write() -> None:
        try:
            table = build()
            export(table, path, fmt)
        except (UserError, OSError) as exc:
            app.call_from_thread(app.notify, printable(f"export failed: {exc}"), severity="error", timeout=8,
                                 markup=False)
            return
        app.call_from_thread(app.notify, printable(f"wrote {len(table):,} rows to {path}"), title="export done",
                             markup=False)

    app.run_worker(write, thread=True, group="export", name=f"export {path.name}")
