"""The Python API for notebooks: the same code paths as the command line, nothing else.

    import ffnscope
    rec = ffnscope.open_recording("smollm2.h5")
    rec.neurons().to_pandas()             # or .to_arrow(), or the Table itself; layers=[0, 1] to narrow
    rec.layers().to_pandas()              # per-layer figures, as `ffnscope export --table layers`
    rec.neuron(3, 97).contexts            # a neuron's detail, as the terminal app shows it
    ffnscope.record("x.h5", model="default", data=["builtin"], tokens=65536)   # as `ffnscope record`
    ffnscope.analyze("x.h5")                                                   # as `ffnscope analyze`

Importing ffnscope imports nothing heavy; torch is imported only by record().
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path


class Frame:
    """A table of the recording (one column per name, numpy arrays), convertible for notebooks."""

    def __init__(self, table):
        self.table = table  # ffnscope.engine.table.table.Table

    @property
    def columns(self) -> list[str]:
        return list(self.table.columns)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, name: str):
        return self.table[name]

    def to_arrow(self):
        from ffnscope.engine.table.export import arrow_table

        return arrow_table(self.table)

    def to_pandas(self):
        try:
            import pandas  # noqa: F401
        except ImportError:
            from ffnscope.cache.errors import UserError

            raise UserError("to_pandas needs pandas; install it with: pip install pandas (or use to_arrow())") from None
        return self.to_arrow().to_pandas()

    def where(self, expr: str) -> "Frame":
        """Rows matching an `ffnscope export --where` expression."""
        from ffnscope.engine.table.filter import filter_rows

        return Frame(self.table.take(filter_rows(self.table, expr)))


class Recording:
    """An open recording cache (read only). Use as a context manager, or call close()."""

    def __init__(self, path: str | Path):
        from ffnscope.cache.reader import CacheReader

        self.path = Path(path)
        self._reader = CacheReader(self.path, "reading it")
        self._index = None

    @property
    def meta(self) -> dict:
        """The recording's provenance as stored (JSON): model, tokenizer, data, recording settings."""
        return self._reader.meta

    @property
    def provenance(self):
        """The same as typed fields: ffnscope.cache.provenance.Provenance."""
        return self._reader.provenance

    def neurons(self, layers: list[int] | None = None) -> Frame:
        from ffnscope.engine.explore.tables import neuron_table

        return Frame(neuron_table(self._reader, layers))

    def layers(self) -> Frame:
        from ffnscope.engine.explore.tables import layer_table

        return Frame(layer_table(self._reader))

    def neuron(self, layer: int, neuron: int):
        """-> ffnscope.engine.analysis.neuron_detail.NeuronDetail: statistics, triggers, promoted and
        suppressed tokens, firing frequency by position, top contexts."""
        import numpy as np

        from ffnscope.cache.errors import UserError
        from ffnscope.engine.explore.detail import neuron_detail
        from ffnscope.engine.explore.index import NeuronIndex

        if self._index is None:
            self._index = NeuronIndex(self._reader)
        d_ffn = self.provenance.model.d_ffn
        if layer not in self._index.layers or not 0 <= neuron < d_ffn:
            raise UserError(f"no neuron {neuron} of layer {layer} in {self.path} (layers "
                            f"{', '.join(map(str, self._index.layers))}; neurons 0-{d_ffn - 1})")
        row = self._index.rows_of(np.array([layer]), np.array([neuron]))[0]
        return neuron_detail(self._reader, self._index, int(row))

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_recording(path: str | Path) -> Recording:
    return Recording(path)


def record(out: str | Path, **options) -> Path:
    """Record as `ffnscope record` does; options are RecordConfig's fields (model, data, tokens, seq_len,
    tau, tau_rule, layers, device, ...). Raises UserError for a bad option. -> the cache's path."""
    from ffnscope.cache.errors import UserError
    from ffnscope.engine.record.config import RecordConfig
    from ffnscope.engine.record.job import record as run

    known = {f.name for f in fields(RecordConfig)} - {"out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown record option(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
    from ffnscope.cache.lock import locked

    with locked(Path(out)):  # one writer per file, as the CLI's
        run(RecordConfig(out=Path(out), **options), log=print)
    return Path(out)


def analyze(path: str | Path, only: list[str] | None = None, settings: list[str] | None = None) -> dict[str, str]:
    """Run (or bring up to date) the stored analyses, as `ffnscope analyze`; -> analysis -> what was done."""
    from ffnscope.cache.lock import locked
    from ffnscope.engine.analysis.job import analyze as run

    with locked(Path(path)):
        return run(Path(path), only, settings, log=print)
