"""The row filter language of tables (`--where`, the app's filter box): a safe subset of Python
expressions evaluated over columns, with SQL's three-valued logic for unknown values."""
from __future__ import annotations

import ast
import operator
from typing import Any, Callable

import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.engine.table.table import _NUMERIC, Table, _split_nulls

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


_CMP: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}


class _Val:
    """An evaluated sub-expression: a column-length array or a Python scalar, and its kind. `known` is
    None when every value is known, else a bool mask (or scalar) that is False where the value is None;
    `data` there holds a placeholder (False, 0, 0.0) that must not be read."""

    __slots__ = ("data", "kind", "text", "known")

    def __init__(self, data: Any, kind: str, text: str, known: Any = None):
        self.data, self.kind, self.text, self.known = data, kind, text, known


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
