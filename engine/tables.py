"""Columnar tables of analysis results: a safe row filter and exports (CSV, JSONL, Parquet, Markdown).

A `Table` is an ordered dict of equal-length numpy columns. Column kinds:
bool, int, float, str (object array of str) and list (object array of lists of str, e.g. trigger tokens).
Strings live in object arrays, never numpy's fixed-width 'U' dtype, which drops trailing NULs.

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
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from cache.errors import UserError

KINDS = ("bool", "int", "float", "str", "list")
FORMATS = ("csv", "jsonl", "parquet", "markdown")


# ---------------------------------------------------------------------------------------------------
# Table


def _kind_of(values: np.ndarray) -> str | None:
    """The kind of a normalized column; None for an empty object column (str or list: unknowable)."""
    k = values.dtype.kind
    if k == "b":
        return "bool"
    if k in "iu":
        return "int"
    if k == "f":
        return "float"
    if len(values) == 0:
        return None
    return "list" if isinstance(values[0], list) else "str"


def _column(name: str, values: Any) -> np.ndarray:
    """A 1-D numpy column of one of the supported kinds (ValueError otherwise: a programming error)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        if values.ndim != 1:
            raise ValueError(f"column {name!r} must be 1-D, got shape {values.shape}")
        return values
    if isinstance(values, np.ndarray) and values.dtype.kind in "US":
        values = values.astype(str).tolist()
    items = list(values)
    if items and all(isinstance(v, (bool, np.bool_)) for v in items):
        return np.array(items, dtype=bool)
    if items and all(isinstance(v, (list, tuple)) for v in items):
        out = np.empty(len(items), dtype=object)  # filled one by one so numpy does not make a 2-D array
        for i, v in enumerate(items):
            if not all(isinstance(s, str) for s in v):
                raise ValueError(f"column {name!r}: list items must be str, row {i} is {v!r}")
            out[i] = list(v)
        return out
    if all(isinstance(v, str) for v in items):  # also the empty column
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out
    arr = np.asarray(items)
    if arr.ndim != 1 or arr.dtype.kind not in "biuf":
        raise ValueError(f"column {name!r} must hold bool, int, float, str or list-of-str values")
    return arr


class Table:
    """An ordered mapping of column name -> 1-D numpy array, all of the same length."""

    def __init__(self, columns: Mapping[str, Any] | None = None, kinds: Mapping[str, str] | None = None):
        # `kinds` is only needed to say whether an empty object column holds str or lists.
        self._cols: dict[str, np.ndarray] = {}
        self._kinds: dict[str, str] = {}
        for name, values in (columns or {}).items():
            col = _column(name, values)
            if self._cols and len(col) != len(self):
                raise ValueError(f"column {name!r} has {len(col)} rows, the others {len(self)}")
            self._cols[name] = col
            self._kinds[name] = _kind_of(col) or (kinds or {}).get(name, "str")

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
        return dict(self._kinds)

    def kind(self, name: str) -> str:
        return self._kinds[name]

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
        """Rows as dicts of plain Python values (bool, int, float, str, list of str)."""
        names = self.columns
        # tolist() turns numpy scalars into Python ones; lists are copied so callers cannot alter the table
        cols = [[list(v) for v in c] if self._kinds[n] == "list" else c.tolist() for n, c in self._cols.items()]
        for values in zip(*cols):
            yield dict(zip(names, values))

    @staticmethod
    def concat(tables: Iterable[Table]) -> Table:
        """Tables with the same columns (same order), one after the other."""
        tables = list(tables)
        if not tables:
            return Table()
        names = tables[0].columns
        for t in tables[1:]:
            if t.columns != names:
                raise ValueError(f"cannot concat tables with columns {names} and {t.columns}")
        kinds = tables[0]._kinds
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
# Anything else (attributes, subscripts, other calls, arithmetic, lambdas...) is refused.


class _Val:
    """An evaluated sub-expression: a column-length array or a Python scalar, and its kind."""

    __slots__ = ("data", "kind", "text")

    def __init__(self, data: Any, kind: str, text: str):
        self.data, self.kind, self.text = data, kind, text


_NUMERIC = {"bool", "int", "float"}
_CMP: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_KEYWORDS = {"true": True, "false": False, "none": None}
_HELPERS = ("contains", "len")


def _literal_kind(value: Any) -> str | None:
    if value is None:
        return "none"
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, types):
            return kind
    return None


class _Filter:
    def __init__(self, table: Table, expr: str):
        self.table, self.expr, self.n = table, expr, len(table)

    def fail(self, problem: str) -> UserError:
        cols = ", ".join(self.table.columns) or "(none)"
        return UserError(f"filter: {problem}; columns: {cols}")

    def snippet(self, node: ast.AST) -> str:
        return ast.unparse(node)  # string literals come back repr-escaped: always one line

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
        if isinstance(val.data, np.ndarray):
            return np.array(val.data, dtype=bool)  # a copy: never the table's own bool column
        return np.full(self.n, bool(val.data))

    def cond(self, node: ast.AST) -> _Val:
        """Evaluate a node that must be a condition (bool)."""
        val = self.eval(node)
        if val.kind != "bool":
            hint = f"; compare it, e.g. {val.text} > 0" if val.kind in ("int", "float") else ""
            raise self.fail(f"'{val.text}' is a {val.kind} value, not a condition{hint}")
        return val

    def eval(self, node: ast.AST) -> _Val:
        text = self.snippet(node)
        if isinstance(node, ast.BoolOp):
            parts = [self.cond(v).data for v in node.values]
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = parts[0]
            for p in parts[1:]:
                out = combine(out, p)
            return _Val(out, "bool", text)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return _Val(np.logical_not(self.cond(node.operand).data), "bool", text)
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                val = self.eval(node.operand)
                if val.kind not in ("int", "float"):
                    raise self.fail(f"cannot negate '{val.text}', a {val.kind} value")
                data = -val.data if isinstance(node.op, ast.USub) else val.data
                return _Val(data, val.kind, text)
        if isinstance(node, ast.Compare):
            return self.compare(node, text)
        if isinstance(node, ast.Name):
            if node.id in self.table:
                return _Val(self.table[node.id], self.table.kind(node.id), node.id)
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
        out: Any = True
        left = self.eval(node.left)
        if len(node.ops) > 1 and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            raise self.fail(f"'in' cannot be chained with other comparisons; use and: {text}")
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                hit = self.isin(left, right_node)
                out = np.logical_not(hit) if isinstance(op, ast.NotIn) else hit
                continue
            if not isinstance(op, tuple(_CMP)):
                raise self.fail(f"operator '{type(op).__name__}' not allowed: {text}")
            right = self.eval(right_node)
            out = np.logical_and(out, self.compare_pair(left, op, right))
            left = right
        return _Val(out, "bool", text)

    def compare_pair(self, left: _Val, op: ast.cmpop, right: _Val) -> Any:
        for v in (left, right):
            if v.kind == "list":
                raise self.fail(f"'{v.text}' is a list column; use contains({v.text}, \"text\") or len({v.text})")
        if "none" in (left.kind, right.kind):
            if not isinstance(op, (ast.Eq, ast.NotEq)):
                raise self.fail("none can only be compared with == or !=")
            same = left.kind == right.kind  # no column holds None, so only none == none is true
            data = same if isinstance(op, ast.Eq) else not same
            arrays = [v.data for v in (left, right) if isinstance(v.data, np.ndarray)]
            return np.full(self.n, data) if arrays else data
        if (left.kind in _NUMERIC) != (right.kind in _NUMERIC):
            raise self.fail(f"cannot compare '{left.text}' ({left.kind}) with '{right.text}' ({right.kind})")
        result = _CMP[type(op)](left.data, right.data)
        return np.asarray(result, dtype=bool) if isinstance(result, np.ndarray) else bool(result)

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
            raise self.fail(f"calls other than contains(column, \"text\") and len(column) not allowed: {text}")
        want = 2 if name == "contains" else 1
        if len(node.args) != want or not isinstance(node.args[0], ast.Name):
            usage = "contains(column, \"text\")" if name == "contains" else "len(column)"
            raise self.fail(f"write {usage}, not {text}")
        col = self.eval(node.args[0])
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
# CSV layout (so `read_back` restores exact Python types; the header says each column's kind):
#   header    name:kind, kind one of bool, int, float, str, list     e.g. layer:int,triggers:list
#   bool      true / false
#   int       decimal
#   float     repr(): the shortest text that reads back to the same float (nan, inf, -inf too)
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
_MD_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _md_text(s: str) -> str:
    out = []
    for ch in s:
        if ch in _MD_SPECIAL:
            out.append("\\" + ch)
        elif ch in _MD_CONTROL:
            out.append(_MD_CONTROL[ch])
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _md_cell(value: Any, kind: str) -> str:
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
    writer.writerow([_guard(f"{n}:{k}") for n, k in zip(table.columns, kinds)])
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
    the target, then os.replace, so readers never see half a file. Errors raise UserError (one line)."""
    fmt = _check_fmt(fmt)
    if fmt == "parquet":
        _import_pyarrow()
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: directory {parent} does not exist; create it first")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file name")
    tmp = parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
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
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_back(path: str | os.PathLike, fmt: str) -> list[dict[str, Any]]:
    """Rows of a file written by `export` (csv, jsonl or parquet), with the Python types they had."""
    fmt = _check_fmt(fmt)
    if fmt == "markdown":
        raise UserError("markdown exports are for reading and cannot be read back; use csv, jsonl or parquet")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot read {path}: no such file")
    if fmt == "parquet":
        _import_pyarrow()
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8", newline="" if fmt == "csv" else None) as f:
        if fmt == "jsonl":
            return [json.loads(line) for line in f if line.strip()]
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        names, kinds = [], []
        for cell in header:
            name, _, kind = _unguard(cell).rpartition(":")
            if kind not in KINDS:
                raise UserError(f"{path}: header cell {cell!r} is not name:kind (kinds: {', '.join(KINDS)})")
            names.append(name)
            kinds.append(kind)
        rows = []
        for cells in reader:
            where = f"{path} line {reader.line_num}"
            if len(cells) != len(names):
                raise UserError(f"{where}: {len(cells)} cells for {len(names)} columns")
            rows.append({n: _from_csv_cell(c, k, where) for n, c, k in zip(names, cells, kinds)})
        return rows
