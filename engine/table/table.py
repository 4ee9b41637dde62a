"""Columnar tables of analysis results (the filter language is in filter.py, exports in export.py).

A `Table` is an ordered dict of equal-length numpy columns. Column kinds:
bool, int, float, str (object array of str) and list (object array of lists of str, e.g. trigger tokens).
Strings live in object arrays, never numpy's fixed-width 'U' dtype, which drops trailing NULs.

bool, int and float columns are nullable: None means "not known" (e.g. a detector flag of a neuron whose
n-gram counts were not kept) and never reads as False or 0. A numeric column that holds a None is an
object array of Python values and None; one without None has a plain numpy dtype. str and list columns
are not nullable (use "" or []). Exports write None as an empty CSV/Markdown cell, JSON null and a
Parquet null; in filters a comparison with None is unknown, which never selects a row.

Token strings are untrusted data and are exported exactly, with one guard: CSV cells are protected
against formula injection (see `export`). Markdown is for reading, so there they are made visible.

No torch, no textual; pyarrow is imported only for Parquet.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

KINDS = ("bool", "int", "float", "str", "list")
FORMATS = ("csv", "jsonl", "parquet", "markdown")

_NUMERIC = {"bool", "int", "float"}
_NUMPY_KIND = {"b": "bool", "i": "int", "u": "int", "f": "float"}
_DTYPES = {"bool": np.bool_, "int": np.int64, "float": np.float64}
_PYTHON = {"bool": bool, "int": int, "float": float}


def _infer_kind(name: str, items: list) -> str | None:
    """The kind of non-None values (None when there are none); ValueError when they have no common kind."""
    if not items:
        return None
    if all(isinstance(v, (bool, np.bool_)) for v in items):
        return "bool"
    if all(isinstance(v, (list, tuple)) for v in items):
        return "list"
    if all(isinstance(v, str) for v in items):
        return "str"
    arr = np.asarray(items)
    if arr.ndim != 1 or arr.dtype.kind not in _NUMPY_KIND:
        raise ValueError(f"column {name!r} must hold bool, int, float, str or list-of-str values (or None)")
    return _NUMPY_KIND[arr.dtype.kind]


def _resolve_kind(name: str, inferred: str | None, declared: str | None) -> str | None:
    if declared is None or inferred is None or inferred == declared:
        return declared or inferred
    if inferred == "int" and declared == "float":
        return "float"
    raise ValueError(f"column {name!r} holds {inferred} values, not {declared}")


def _column(name: str, values: Any, declared: str | None = None) -> tuple[np.ndarray, str]:
    """A 1-D numpy column and its kind (ValueError for anything unsupported: a programming error).

    `declared` (a kind) is needed when the values cannot tell: an empty column (default str) or one that
    holds only None. Otherwise it must agree with the values (int values may be declared float)."""
    if declared is not None and declared not in KINDS:
        raise ValueError(f"column {name!r}: unknown kind {declared!r}; kinds: {', '.join(KINDS)}")
    if isinstance(values, np.ndarray) and values.dtype.kind in _NUMPY_KIND:
        if values.ndim != 1:
            raise ValueError(f"column {name!r} must be 1-D, got shape {values.shape}")
        kind = _resolve_kind(name, _NUMPY_KIND[values.dtype.kind], declared)
        return (values if kind == _NUMPY_KIND[values.dtype.kind] else values.astype(_DTYPES[kind])), kind
    if isinstance(values, np.ndarray) and values.dtype.kind in "US":
        values = values.astype(str).tolist()
    items = list(values)
    has_none = any(v is None for v in items)
    present = [v for v in items if v is not None] if has_none else items
    kind = _resolve_kind(name, _infer_kind(name, present), declared)
    if kind is None:
        if items:
            raise ValueError(f"column {name!r} holds only None; give its kind (bool, int or float) in kinds=")
        kind = "str"
    if has_none and kind not in _NUMERIC:
        raise ValueError(f"column {name!r} is a {kind} column and cannot hold None (use an empty {kind})")
    if kind in _NUMERIC and not has_none:
        if not items:
            return np.empty(0, dtype=_DTYPES[kind]), kind
        arr = np.asarray(items)
        return (arr if _NUMPY_KIND[arr.dtype.kind] == kind else arr.astype(_DTYPES[kind])), kind
    out = np.empty(len(items), dtype=object)  # filled one by one so numpy does not make a 2-D array
    if kind in _NUMERIC:  # nullable: Python values and None, so rows() gives exact Python types
        py = _PYTHON[kind]
        for i, v in enumerate(items):
            out[i] = None if v is None else py(v)
    elif kind == "list":
        for i, v in enumerate(items):
            if not all(isinstance(s, str) for s in v):
                raise ValueError(f"column {name!r}: list items must be str, row {i} is {v!r}")
            out[i] = list(v)
    else:
        out[:] = items
    return out, kind


def _split_nulls(col: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A numeric column with None filled by a placeholder (False, 0, 0.0), and the mask of known values;
    the column itself and None for a column that holds no None."""
    if col.dtype != object or kind not in _NUMERIC:
        return col, None
    known = np.fromiter((v is not None for v in col), dtype=bool, count=len(col))
    fill = _PYTHON[kind](0)
    filled = np.array([fill if v is None else v for v in col], dtype=_DTYPES[kind])
    return filled, known


class Table:
    """An ordered mapping of column name -> 1-D numpy array, all of the same length."""

    def __init__(self, columns: Mapping[str, Any] | None = None, kinds: Mapping[str, str] | None = None):
        # `kinds` (name -> kind, e.g. another table's .kinds) is needed only where the values cannot tell:
        # an empty column (str unless told) or a column of only None. Where given it must fit the values.
        self._cols: dict[str, np.ndarray] = {}
        self._kinds: dict[str, str] = {}
        kinds = kinds or {}
        for name, values in (columns or {}).items():
            col, kind = _column(name, values, kinds.get(name))
            if self._cols and len(col) != len(self):
                raise ValueError(f"column {name!r} has {len(col)} rows, the others {len(self)}")
            self._cols[name] = col
            self._kinds[name] = kind

    def __len__(self) -> int:
        return len(next(iter(self._cols.values()))) if self._cols else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self._cols[name]

    def __contains__(self, name: object) -> bool:
        return name in self._cols

    def __repr__(self) -> str:
        cols = ", ".join(f"{n}:{k}" for n, k in self._kinds.items())
        return f"Table({len(self)} rows; {cols})"

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    @property
    def kinds(self) -> dict[str, str]:
        """Column name -> kind, in column order: what `read_back` needs to read a CSV export."""
        return dict(self._kinds)

    def kind(self, name: str) -> str:
        return self._kinds[name]

    def has_none(self, name: str) -> bool:
        """Whether the column holds a None (it is then an object array)."""
        return self._cols[name].dtype == object and self._kinds[name] in _NUMERIC

    def take(self, rows: np.ndarray | Sequence[int] | Sequence[bool]) -> Table:
        """The rows selected by a boolean mask (of length len(self)) or by integer indices, in order."""
        idx = np.asarray(rows)
        if idx.dtype.kind == "b" and len(idx) != len(self):
            raise ValueError(f"mask has {len(idx)} entries for {len(self)} rows")
        if idx.size == 0:
            idx = idx.astype(np.int64)  # an empty Python list arrives as float64
        elif idx.dtype.kind not in "biu":
            raise ValueError(f"take() needs a bool mask or integer indices, got {idx.dtype}")
        return Table({n: c[idx] for n, c in self._cols.items()}, self._kinds)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Rows as dicts of plain Python values (bool, int, float, str, list of str; None where not known)."""
        names = self.columns
        # tolist() turns numpy scalars into Python ones; lists are copied so callers cannot alter the table
        cols = [[list(v) for v in c] if self._kinds[n] == "list" else c.tolist() for n, c in self._cols.items()]
        for values in zip(*cols):
            yield dict(zip(names, values))

    @staticmethod
    def concat(tables: Iterable[Table]) -> Table:
        """Tables with the same columns (same order), one after the other. int and float columns of the
        same name make a float column; a column with None in any table holds None in the result."""
        tables = list(tables)
        if not tables:
            return Table()
        names = tables[0].columns
        for t in tables[1:]:
            if t.columns != names:
                raise ValueError(f"cannot concat tables with columns {names} and {t.columns}")
        voices = [t for t in tables if len(t)] or tables[:1]  # an empty table's guessed kinds do not count
        kinds = {}
        for n in names:
            ks = {t.kind(n) for t in voices}
            if len(ks) > 1 and ks != {"int", "float"}:
                raise ValueError(f"cannot concat column {n!r} of kinds {', '.join(sorted(ks))}")
            kinds[n] = "float" if len(ks) > 1 else ks.pop()
        return Table({n: np.concatenate([t[n] for t in tables]) for n in names}, kinds)


concat = Table.concat
