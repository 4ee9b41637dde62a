"""Columnar tables of analysis results: a safe row filter and exports (CSV, JSONL, Parquet, Markdown).

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

import ast
import csv
import json
import operator
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.engine.safe_text import printable

KINDS = ("bool", "int", "float", "str", "list")
FORMATS = ("csv", "jsonl", "parquet", "markdown")

_NUMERIC = {"bool", "int", "float"}
_NUMPY_KIND = {"b": "bool", "i": "int", "u": "int", "f": "float"}
_DTYPES = {"bool": np.bool_, "int": np.int64, "float": np.float64}
_PYTHON = {"bool": bool, "int": int, "float": float}


# ---------------------------------------------------------------------------------------------------
# Table


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


# ---------------------------------------------------------------------------------------------------
# Filter expressions
#
# Grammar (a whitelist over Python's own expression syntax, checked node by node):
#   comparisons  == != < <= > >=  (chained: 0 < x <= 5)     and, or, not, parentheses
#   literals     numbers, "strings", true/false/none (or True/False/None), -number
#   x in ("a", "b") / x not in (1, 2)                        the right side must be a literal list/tuple
#   a bare bool column as a condition                        token_detector and not dead
#   contains(col, "text")  list column: some item equals text; str column: text is a substring
#   len(col)               number of items (list column) or characters (str column)
#   known(col) / missing(col)   the value is / is not None (any column; only numeric ones hold None)
# Anything else (attributes, subscripts, other calls, arithmetic, lambdas...) is refused.
#
# None ("not known") follows SQL's three-valued logic. A comparison involving None, `in` included, is
# unknown; so is a bare nullable bool column where it is None. `not` of unknown is unknown; `and` / `or`
# are unknown only when the known parts do not decide (false and unknown = false, true or unknown = true).
# A row is selected only where the whole condition is true, so None rows match neither `flag` nor
# `not flag`, neither `x > 3` nor `not (x > 3)`, and `x == none` matches nothing: use missing(x).


class _Val:
    """An evaluated sub-expression: a column-length array or a Python scalar, and its kind. `known` is
    None when every value is known, else a bool mask (or scalar) that is False where the value is None;
    `data` there holds a placeholder (False, 0, 0.0) that must not be read."""

    __slots__ = ("data", "kind", "text", "known")

    def __init__(self, data: Any, kind: str, text: str, known: Any = None):
        self.data, self.kind, self.text, self.known = data, kind, text, known


_CMP: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_KEYWORDS = {"true": True, "false": False, "none": None}
_HELPERS = ("contains", "len", "known", "missing")
_USAGE = {"contains": "contains(column, \"text\")", "len": "len(column)", "known": "known(column)",
          "missing": "missing(column)"}


def _literal_kind(value: Any) -> str | None:
    if value is None:
        return "none"
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, types):
            return kind
    return None


def _both_known(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return np.logical_and(a, b)


def _true_false(val: _Val) -> tuple[Any, Any]:
    """Where a condition is true, and where it is false (neither where it is unknown)."""
    if val.known is None:
        return val.data, np.logical_not(val.data)
    return np.logical_and(val.data, val.known), np.logical_and(np.logical_not(val.data), val.known)


def _from_true_false(true: Any, false: Any, text: str) -> _Val:
    return _Val(true, "bool", text, np.logical_or(true, false))


class _Filter:
    def __init__(self, table: Table, expr: str):
        self.table, self.expr, self.n = table, expr, len(table)
        self._split: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def fail(self, problem: str) -> UserError:
        cols = ", ".join(self.table.columns) or "(none)"
        return UserError(f"filter: {problem}; columns: {cols}")

    def snippet(self, node: ast.AST) -> str:
        return ast.unparse(node)  # string literals come back repr-escaped: always one line

    def column(self, name: str) -> _Val:
        if name not in self._split:  # a nullable column is split once, however often it is named
            self._split[name] = _split_nulls(self.table[name], self.table.kind(name))
        data, known = self._split[name]
        return _Val(data, self.table.kind(name), name, known)

    def run(self) -> np.ndarray:
        try:
            tree = ast.parse(self.expr.strip(), mode="eval")
        except SyntaxError as e:
            raise self.fail(f"cannot parse {self.expr!r}: {e.msg}") from None
        except (ValueError, RecursionError, MemoryError):  # NUL bytes, absurd nesting
            raise self.fail(f"cannot parse {self.expr!r}") from None
        try:
            val = self.cond(tree.body)
        except RecursionError:
            raise self.fail("the expression is nested too deeply") from None
        true, _ = _true_false(val)
        if isinstance(true, np.ndarray) and true.shape == (self.n,):
            return np.array(true, dtype=bool)  # a copy: never the table's own bool column
        return np.full(self.n, bool(true))

    def cond(self, node: ast.AST) -> _Val:
        """Evaluate a node that must be a condition (bool)."""
        val = self.eval(node)
        if val.kind != "bool":
            hint = f"; compare it, e.g. {val.text} > 0" if val.kind in ("int", "float") else ""
            article = "an" if val.kind == "int" else "a"
            raise self.fail(f"'{val.text}' is {article} {val.kind} value, not a condition{hint}")
        return val

    def eval(self, node: ast.AST) -> _Val:
        text = self.snippet(node)
        if isinstance(node, ast.BoolOp):
            parts = [_true_false(self.cond(v)) for v in node.values]
            true, false = parts[0]
            for t, f in parts[1:]:
                if isinstance(node.op, ast.And):
                    true, false = np.logical_and(true, t), np.logical_or(false, f)
                else:
                    true, false = np.logical_or(true, t), np.logical_and(false, f)
            return _from_true_false(true, false, text)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                true, false = _true_false(self.cond(node.operand))
                return _from_true_false(false, true, text)
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                val = self.eval(node.operand)
                if val.kind not in ("int", "float"):
                    raise self.fail(f"cannot negate '{val.text}', a {val.kind} value")
                data = -val.data if isinstance(node.op, ast.USub) else val.data
                return _Val(data, val.kind, text, val.known)
        if isinstance(node, ast.Compare):
            return self.compare(node, text)
        if isinstance(node, ast.Name):
            if node.id in self.table:
                return self.column(node.id)
            if node.id.lower() in _KEYWORDS:
                value = _KEYWORDS[node.id.lower()]
                return _Val(value, _literal_kind(value), text)
            raise self.fail(f"unknown column '{node.id}'")
        if isinstance(node, ast.Constant):
            kind = _literal_kind(node.value)
            if kind is None:
                raise self.fail(f"literal {text} is not allowed (numbers, strings, true, false, none)")
            return _Val(node.value, kind, text)
        if isinstance(node, ast.Call):
            return self.call(node, text)
        raise self.fail(f"{_describe(node)} not allowed: {text}")

    def compare(self, node: ast.Compare, text: str) -> _Val:
        true: Any = True
        false: Any = False
        left = self.eval(node.left)
        if len(node.ops) > 1 and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            raise self.fail(f"'in' cannot be chained with other comparisons; use and: {text}")
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                hit = _Val(self.isin(left, right_node), "bool", text, left.known)
                t, f = _true_false(hit)
                true, false = (f, t) if isinstance(op, ast.NotIn) else (t, f)
                continue
            if not isinstance(op, tuple(_CMP)):
                raise self.fail(f"operator '{type(op).__name__}' not allowed: {text}")
            right = self.eval(right_node)
            t, f = _true_false(self.compare_pair(left, op, right, text))
            true, false = np.logical_and(true, t), np.logical_or(false, f)  # a < b < c: a < b and b < c
            left = right
        return _from_true_false(true, false, text)

    def compare_pair(self, left: _Val, op: ast.cmpop, right: _Val, text: str) -> _Val:
        for v in (left, right):
            if v.kind == "list":
                raise self.fail(f"'{v.text}' is a list column; use contains({v.text}, \"text\") or len({v.text})")
        if "none" in (left.kind, right.kind):
            if not isinstance(op, (ast.Eq, ast.NotEq)):
                raise self.fail("none can only be compared with == or !=")
            return _Val(False, "bool", text, False)  # like SQL: x == NULL is unknown, whatever x is
        if (left.kind in _NUMERIC) != (right.kind in _NUMERIC):
            raise self.fail(f"cannot compare '{left.text}' ({left.kind}) with '{right.text}' ({right.kind})")
        result = _CMP[type(op)](left.data, right.data)
        data = np.asarray(result, dtype=bool) if isinstance(result, np.ndarray) else bool(result)
        return _Val(data, "bool", text, _both_known(left.known, right.known))

    def isin(self, left: _Val, node: ast.AST) -> Any:
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            hint = " (for list or str columns use contains(column, \"text\"))" if isinstance(node, ast.Name) else ""
            raise self.fail(f"'in' needs a literal list like (\"a\", \"b\"), not '{self.snippet(node)}'{hint}")
        items = [self.eval(e) for e in node.elts]
        for item in items:
            if isinstance(item.data, np.ndarray):
                raise self.fail(f"'in' needs literal values, '{item.text}' is a column")
        if left.kind == "list":
            raise self.fail(f"'{left.text}' is a list column; use contains({left.text}, \"text\")")
        for item in items:
            if item.kind == "none" or (item.kind in _NUMERIC) != (left.kind in _NUMERIC):
                raise self.fail(f"cannot look for {item.text} ({item.kind}) in '{left.text}' ({left.kind})")
        values = [item.data for item in items]
        if not isinstance(left.data, np.ndarray):
            return left.data in values
        if left.kind == "str":
            wanted = set(values)
            return np.fromiter((s in wanted for s in left.data), dtype=bool, count=self.n)
        return np.isin(left.data, values) if values else np.zeros(self.n, dtype=bool)

    def call(self, node: ast.Call, text: str) -> _Val:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _HELPERS or node.keywords:
            allowed = ", ".join(_USAGE[h] for h in _HELPERS)
            raise self.fail(f"calls other than {allowed} not allowed: {text}")
        want = 2 if name == "contains" else 1
        if len(node.args) != want or not isinstance(node.args[0], ast.Name):
            raise self.fail(f"write {_USAGE[name]}, not {text}")
        col = self.eval(node.args[0])
        if not isinstance(col.data, np.ndarray):
            raise self.fail(f"{name}() needs a column, '{col.text}' is a literal")
        if name in ("known", "missing"):
            known = np.ones(self.n, dtype=bool) if col.known is None else col.known
            return _Val(np.array(known) if name == "known" else np.logical_not(known), "bool", text)
        if col.kind not in ("str", "list"):
            raise self.fail(f"{name}() needs a str or list column, '{col.text}' is {col.kind}")
        if name == "len":
            return _Val(np.fromiter((len(v) for v in col.data), dtype=np.int64, count=self.n), "int", text)
        needle = node.args[1]
        if not (isinstance(needle, ast.Constant) and isinstance(needle.value, str)):
            raise self.fail(f"contains() needs a quoted string as its second argument: {text}")
        s = needle.value
        # list column: some item equals s (a token is a unit); str column: s is a substring
        hits = (s in v for v in col.data)
        return _Val(np.fromiter(hits, dtype=bool, count=self.n), "bool", text)


def _describe(node: ast.AST) -> str:
    names = {ast.Attribute: "attribute access", ast.Subscript: "subscripts", ast.BinOp: "arithmetic",
             ast.Lambda: "lambda", ast.IfExp: "if-else", ast.NamedExpr: "assignment",
             ast.JoinedStr: "f-strings", ast.Tuple: "a tuple outside 'in'", ast.List: "a list outside 'in'",
             ast.Set: "a set outside 'in'", ast.Dict: "dicts", ast.Starred: "starred expressions"}
    return names.get(type(node), f"'{type(node).__name__}'")


def filter_rows(table: Table, expr: str) -> np.ndarray:
    """A boolean mask of the rows where `expr` holds (see the grammar above). A blank expression keeps
    every row. Unknown columns and anything outside the grammar raise UserError (one line)."""
    if not expr.strip():
        return np.ones(len(table), dtype=bool)
    return _Filter(table, expr).run()


# ---------------------------------------------------------------------------------------------------
# Export
#
# CSV layout (so `read_back`, given the table's kinds, restores exact Python types):
#   header    the bare column names, e.g. layer,neuron,triggers (pandas and spreadsheets read it as is)
#   bool      true / false
#   int       decimal
#   float     repr(): the shortest text that reads back to the same float (nan, inf, -inf too)
#   None      an empty cell (only bool, int and float columns hold None; a str cell may be empty text)
#   str       the string itself, exactly (control characters included; the csv module quotes as needed)
#   list      a JSON array of strings, ensure_ascii=False, e.g. ["a", "b"]
# Formula-injection guard (OWASP): every text cell (header, str, list) that starts with = + - @ TAB CR,
# or with a single quote ', gets one ' prepended. Prefixing cells that already start with ' makes the
# scheme unambiguous: read_back drops exactly one leading ' from every text cell that has one.

_DANGEROUS_START = ("=", "+", "-", "@", "\t", "\r", "'")


def _guard(cell: str) -> str:
    return "'" + cell if cell.startswith(_DANGEROUS_START) else cell


def _unguard(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def _csv_cell(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "int":
        return str(int(value))
    if kind == "float":
        return repr(float(value))
    if kind == "list":
        return _guard(json.dumps(list(value), ensure_ascii=False))
    return _guard(value)


def _from_csv_cell(cell: str, kind: str, where: str) -> Any:
    if cell == "" and kind in _NUMERIC:
        return None
    try:
        if kind == "bool":
            if cell not in ("true", "false"):
                raise ValueError(cell)
            return cell == "true"
        if kind == "int":
            return int(cell)
        if kind == "float":
            return float(cell)
        if kind == "list":
            items = json.loads(_unguard(cell))
            if not (isinstance(items, list) and all(isinstance(s, str) for s in items)):
                raise ValueError(cell)
            return items
        return _unguard(cell)
    except ValueError:
        raise UserError(f"{where}: {cell[:40]!r} is not a {kind} value") from None


# Markdown: text cells are for reading, not round-tripping. Characters that could break the table or
# be taken as markup get a backslash; control characters are shown as escapes (\n, \x1b, ...).
_MD_SPECIAL = set("\\|`*_[]<>~&")


def _md_text(s: str) -> str:
    """Markdown's specials backslash-escaped, everything else through the one sanitizer (engine.safe_text)."""
    return "".join("\\" + ch if ch in _MD_SPECIAL else printable(ch) for ch in str(s))


def _md_cell(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "float":
        return repr(float(value))
    if kind == "int":
        return str(int(value))
    if kind == "list":
        return _md_text(json.dumps(list(value), ensure_ascii=False))
    return _md_text(value)


def _write_csv(table: Table, f) -> None:
    writer = csv.writer(f)  # excel dialect: CRLF rows, fields with , " CR LF quoted
    kinds = [table.kind(n) for n in table.columns]
    writer.writerow([_guard(n) for n in table.columns])
    for row in table.rows():
        writer.writerow([_csv_cell(v, k) for v, k in zip(row.values(), kinds)])


def _write_jsonl(table: Table, f) -> None:
    for row in table.rows():
        # json escapes control characters (\u001b, \r, \n, \u0000), so one row is one line
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_markdown(table: Table, f) -> None:
    kinds = [table.kind(n) for n in table.columns]
    f.write("| " + " | ".join(_md_text(n) for n in table.columns) + " |\n")
    f.write("|" + "|".join("---:" if k in ("int", "float") else "---" for k in kinds) + "|\n")
    for row in table.rows():
        f.write("| " + " | ".join(_md_cell(v, k) for v, k in zip(row.values(), kinds)) + " |\n")


def _arrow_table(table: Table):
    import pyarrow as pa

    types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(),
             "list": pa.list_(pa.string())}
    arrays = [pa.array(table[n].tolist(), type=types[table.kind(n)]) for n in table.columns]
    return pa.Table.from_arrays(arrays, names=table.columns)


def _import_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError("parquet needs pyarrow; install it with: pip install pyarrow") from None


def _check_fmt(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return fmt


def export(table: Table, path: str | os.PathLike, fmt: str) -> None:
    """Write `table` to `path` as csv, jsonl, parquet or markdown, atomically: into a temporary file beside
    the target, then os.replace, so readers never see half a file. Errors raise UserError (one line).
    A CSV header holds the bare column names: keep `table.kinds` to read it back with `read_back`."""
    fmt = _check_fmt(fmt)
    if fmt == "parquet":
        _import_pyarrow()
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: directory {parent} does not exist; create it first")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file name")
    tmp = parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # the pid: stale once it is dead
    try:
        # os.open with 0o666 lets the umask decide permissions, like a plain open() would
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with os.fdopen(fd, "wb") as f:
                pq.write_table(_arrow_table(table), f)
        else:
            # csv: the csv module writes its own line ends; jsonl/markdown: always \n
            with os.fdopen(fd, "w", encoding="utf-8", newline="" if fmt == "csv" else "\n") as f:
                {"csv": _write_csv, "jsonl": _write_jsonl, "markdown": _write_markdown}[fmt](table, f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        from ffnscope.cache.store import storage_error  # the path, why, and the free space there

        raise storage_error(path, None, e.strerror or str(e), f"cannot write {path}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_ARROW_KINDS = {"bool": "bool", "int64": "int", "double": "float", "string": "str", "large_string": "str",
                "list<item: string>": "list", "list<element: string>": "list"}


def _check_kinds(kinds: Mapping[str, str] | None) -> dict[str, str] | None:
    if kinds is None:
        return None
    bad = [f"{n}:{k}" for n, k in kinds.items() if k not in KINDS]
    if bad:
        raise UserError(f"unknown column kind in {', '.join(bad)}; kinds: {', '.join(KINDS)}")
    return dict(kinds)


def _check_names(path: Path, names: Sequence[str], kinds: Mapping[str, str]) -> None:
    if sorted(names) != sorted(kinds):
        raise UserError(f"{path}: the file has columns {', '.join(names) or '(none)'}, "
                        f"the kinds given name {', '.join(kinds) or '(none)'}")


def _check_value(value: Any, kind: str, where: str) -> None:
    if value is None:
        ok = kind in _NUMERIC
    elif kind == "list":
        ok = isinstance(value, list) and all(isinstance(s, str) for s in value)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, {"bool": bool, "float": float, "str": str}[kind])
    if not ok:
        raise UserError(f"{where}: {repr(value)[:40]} is not a {kind} value")


def read_back(path: str | os.PathLike, fmt: str, kinds: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a file written by `export` (csv, jsonl or parquet), with the Python types they had and None
    where a value was not known. `kinds` (column name -> kind, e.g. `table.kinds`) is required for csv,
    whose header holds only the names; for jsonl and parquet it is optional and, if given, checked."""
    fmt = _check_fmt(fmt)
    if fmt == "markdown":
        raise UserError("markdown exports are for reading and cannot be read back; use csv, jsonl or parquet")
    kinds = _check_kinds(kinds)
    if fmt == "csv" and kinds is None:
        raise UserError("reading a csv export back needs its column kinds: read_back(path, 'csv', table.kinds)")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot read {path}: no such file")
    if fmt == "parquet":
        _import_pyarrow()
        import pyarrow.parquet as pq

        arrow = pq.read_table(path)
        if kinds is not None:
            _check_names(path, arrow.column_names, kinds)
            for field in arrow.schema:
                if _ARROW_KINDS.get(str(field.type)) != kinds[field.name]:
                    raise UserError(f"{path}: column {field.name} is {field.type}, not {kinds[field.name]}")
        return arrow.to_pylist()
    with open(path, encoding="utf-8", newline="" if fmt == "csv" else None) as f:
        if fmt == "jsonl":
            rows = []
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise UserError(f"{path} line {i}: not a JSON object") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path} line {i}: not a JSON object")
                if kinds is not None:
                    _check_names(path, list(row), kinds)
                    for n, v in row.items():
                        _check_value(v, kinds[n], f"{path} line {i} column {n}")
                rows.append(row)
            return rows
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        names = [_unguard(cell) for cell in header]
        _check_names(path, names, kinds)
        col_kinds = [kinds[n] for n in names]
        rows = []
        for cells in reader:
            where = f"{path} line {reader.line_num}"
            if len(cells) != len(names):
                raise UserError(f"{where}: {len(cells)} cells for {len(names)} columns")
            rows.append({n: _from_csv_cell(c, k, where) for n, c, k in zip(names, cells, col_kinds)})
        return rows
