"""engine.table.table: the columnar Table, the safe filter language, and exports that keep hostile token strings."""
import csv
import json
import math
import os

import numpy as np
import pytest

from ffnscope.cache.errors import UserError
from ffnscope.engine.table.table import Table, concat
from ffnscope.engine.table.export import export, read_back
from ffnscope.engine.table.filter import filter_rows

HOSTILE = ["\x1b[31mred\x1b[0m", "[bold red]x[/]", "a\r\nb", "\x00nul", "=1+2", "+cmd", "-x", "@SUM(A1)",
           "'=already", "", "日本", "\tTAB", "\rCR", "'", "a|b`c\\", "line\u2028sep\x85", "\"quoted\",comma"]


def hostile_table() -> Table:
    n = len(HOSTILE)
    return Table({
        "tok": HOSTILE,
        "triggers": [[s, "plain"] if i % 3 else [] if i % 2 else [s] for i, s in enumerate(HOSTILE)],
        "layer": np.arange(n, dtype=np.int64) - 3,
        "score": [0.1 + 0.2, 1e-300, -0.0, 1 / 3, math.inf, 2.5e17] + [float(i) / 7 for i in range(n - 6)],
        "flag": [i % 2 == 0 for i in range(n)],
    })


def expected_rows(table: Table) -> list[dict]:
    return list(table.rows())


# --- Table ---------------------------------------------------------------------------------------


def test_table_basics():
    t = hostile_table()
    assert len(t) == len(HOSTILE)
    assert t.columns == ["tok", "triggers", "layer", "score", "flag"]
    assert t.kinds == {"tok": "str", "triggers": "list", "layer": "int", "score": "float", "flag": "bool"}
    row = next(t.rows())
    assert row == {"tok": HOSTILE[0], "triggers": [HOSTILE[0]], "layer": -3, "score": 0.1 + 0.2, "flag": True}
    assert [type(v) for v in row.values()] == [str, list, int, float, bool]
    # NUL survives (numpy's 'U' dtype would drop a trailing one)
    assert Table({"s": np.array(["x"])})["s"].dtype == object
    assert next(Table({"s": ["x\x00"]}).rows())["s"] == "x\x00"


def test_take_and_concat():
    t = hostile_table()
    assert [r["layer"] for r in t.take([2, 0]).rows()] == [-1, -3]
    mask = t["flag"]
    assert len(t.take(mask)) == int(mask.sum())
    empty = t.take([])
    assert len(empty) == 0 and empty.kinds == t.kinds  # an empty list column stays a list column
    both = concat([t, t.take(np.arange(3))])
    assert len(both) == len(t) + 3 and list(both.rows())[-1] == list(t.rows())[2]
    assert Table.concat([]).columns == []
    with pytest.raises(ValueError):
        concat([t, Table({"x": [1]})])
    with pytest.raises(ValueError):
        Table({"a": [1, 2], "b": [1]})


# --- exports -------------------------------------------------------------------------------------


def _export_and_read(table, tmp_path, fmt):
    """Export, read back with the table's kinds; -> (path, rows read, rows expected)."""
    path = tmp_path / f"out.{fmt}"
    export(table, path, fmt)
    return path, read_back(path, fmt, table.kinds), expected_rows(table)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_round_trip_exact(tmp_path, fmt):
    t = hostile_table()
    path, back, want = _export_and_read(t, tmp_path, fmt)
    assert back == want
    for got, exp in zip(back, want):
        assert [type(v) for v in got.values()] == [type(v) for v in exp.values()]
        assert math.copysign(1, got["score"]) == math.copysign(1, exp["score"])  # -0.0 stays -0.0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    if fmt != "csv":
        assert read_back(path, fmt) == want  # kinds are optional where the file carries its types


def test_csv_cells_are_guarded(tmp_path):
    path = tmp_path / "out.csv"
    export(hostile_table(), path, "csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["tok", "triggers", "layer", "score", "flag"]  # bare names, for pandas and spreadsheets
    text_cells = [r[0] for r in rows[1:]] + [r[1] for r in rows[1:]]
    for cell in text_cells:
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    by_value = dict(zip(HOSTILE, (r[0] for r in rows[1:])))
    assert by_value["=1+2"] == "'=1+2"
    assert by_value["'=already"] == "''=already"  # a leading quote is always doubled: unambiguous
    assert by_value["\x1b[31mred\x1b[0m"] == "\x1b[31mred\x1b[0m"  # otherwise exact
    assert json.loads(rows[2][1]) == ["[bold red]x[/]", "plain"]
    # numbers are numbers, never quoted text: a negative one may start with '-'
    assert rows[1][2] == "-3" and rows[1][3] == repr(0.1 + 0.2)


def test_jsonl_one_object_per_line(tmp_path):
    path = tmp_path / "out.jsonl"
    export(hostile_table(), path, "jsonl")
    raw = path.read_bytes()
    assert raw.count(b"\n") == len(HOSTILE) and b"\r" not in raw and b"\x1b" not in raw
    assert "日本" in raw.decode("utf-8")  # ensure_ascii=False


def test_parquet_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "out.parquet"
    export(hostile_table(), path, "parquet")
    schema = pq.read_schema(path)
    assert schema.field("triggers").type == pa.list_(pa.string())
    assert [str(schema.field(n).type) for n in ("tok", "layer", "score", "flag")] == \
        ["string", "int64", "double", "bool"]


def test_markdown_stays_a_table(tmp_path):
    t = hostile_table()
    path = tmp_path / "out.md"
    export(t, path, "markdown")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(t) + 2
    assert "\x1b" not in text and "\r" not in text and "\x00" not in text
    for line in lines[:-1]:
        # a row has exactly len(columns)+1 unescaped pipes
        unescaped = line.replace("\\\\", "").replace("\\|", "")
        assert unescaped.count("|") == len(t.columns) + 1, line


def test_export_errors(tmp_path):
    t = hostile_table()
    for bad, fmt in [(tmp_path / "missing" / "x.csv", "csv"), (tmp_path, "csv"), (tmp_path / "x.txt", "xlsx")]:
        with pytest.raises(UserError) as e:
            export(t, bad, fmt)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        read_back(tmp_path / "nope.csv", "csv", t.kinds)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write"):
            export(hostile_table(), locked / "x.jsonl", "jsonl")
    finally:
        locked.chmod(0o700)


def test_failed_write_leaves_target_and_no_temp(tmp_path, monkeypatch):
    import ffnscope.engine.table.export as tables

    path = tmp_path / "out.csv"
    path.write_text("old")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tables.os, "replace", refuse)
    with pytest.raises(UserError, match="cannot write .*Permission denied"):
        export(hostile_table(), path, "csv")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_export_replaces_existing_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    export(Table({"a": [1]}), path, "jsonl")
    assert read_back(path, "jsonl") == [{"a": 1}]
    assert read_back(path, "jsonl", {"a": "int"}) == [{"a": 1}]


# --- filter_rows ---------------------------------------------------------------------------------


@pytest.fixture
def neurons() -> Table:
    return Table({
        "layer": [0, 1, 2, 3, 4],
        "frac": [0.0, 0.25, 0.5, 0.75, 1.0],
        "pos_type": ["oscillatory", "both_extremes", "other", "one_extreme", "oscillatory"],
        "token_detector": [True, True, False, True, False],
        "dead": [False, True, False, False, True],
        "triggers": [["the", " a"], ["=1"], [], ["the"], ["x\x1b"]],
        "tok": ["hello", "[bold]", "a|b", "THE", ""],
    })


def rows_of(table: Table, expr: str) -> list[int]:
    mask = filter_rows(table, expr)
    assert mask.dtype == bool and mask.shape == (len(table),)
    return np.flatnonzero(mask).tolist()


@pytest.mark.parametrize("expr, want", [
    ("layer == 2", [2]),
    ("layer != 2", [0, 1, 3, 4]),
    ("layer >= 3", [3, 4]),
    ("1 <= layer < 3", [1, 2]),
    ("frac > 0.3 and frac <= 0.75", [2, 3]),
    ("layer < 1 or layer > 3", [0, 4]),
    ("not (layer < 1 or layer > 3)", [1, 2, 3]),
    ("layer > -1", [0, 1, 2, 3, 4]),
    ("pos_type == 'other'", [2]),
    ('pos_type in ("oscillatory", "both_extremes")', [0, 1, 4]),
    ("pos_type not in ['oscillatory']", [1, 2, 3]),
    ("layer in (1, 3)", [1, 3]),
    ("token_detector", [0, 1, 3]),
    ("token_detector and not dead", [0, 3]),
    ("token_detector == true", [0, 1, 3]),
    ("dead == False", [0, 2, 3]),
    ('contains(triggers, "the")', [0, 3]),
    ('contains(triggers, "th")', []),  # list items must be equal, not just contain
    ('contains(triggers, "x\\x1b")', [4]),
    ('contains(tok, "|")', [2]),  # str column: substring
    ("len(triggers) == 0", [2]),
    ("len(tok) > 4", [0, 1]),
    ("tok == '[bold]'", [1]),
    ("tok == none", []),
    ("true", [0, 1, 2, 3, 4]),
    ("  ", [0, 1, 2, 3, 4]),  # a blank filter keeps every row
])
def test_filter_constructs(neurons, expr, want):
    assert rows_of(neurons, expr) == want


def test_filter_mask_is_a_copy(neurons):
    mask = filter_rows(neurons, "dead")
    mask[:] = False
    assert neurons["dead"].tolist() == [False, True, False, False, True]


@pytest.mark.parametrize("expr, words", [
    ("nope > 1", "unknown column 'nope'"),
    ("__import__('os')", "not allowed"),
    ("__import__('os').system('echo hi')", "not allowed"),
    ("a.b", "attribute access"),
    ("layer.real > 0", "attribute access"),
    ("triggers[0] == 'x'", "subscripts"),
    ("layer + 1 > 2", "arithmetic"),
    ("(lambda: 1)()", "not allowed"),
    ("layer", "not a condition"),
    ("tok > 3", "cannot compare"),
    ("triggers == 'the'", "list column"),
    ("'the' in triggers", "literal list"),
    ("layer in ('a',)", "cannot look for"),
    ("contains(layer, 'x')", "str or list column"),
    ("contains(triggers, tok)", "quoted string"),
    ("layer ==", "cannot parse"),
    ("layer == 1\nor True", "cannot parse"),
    ("b'x' == tok", "not allowed"),
    ("[x for x in tok]", "not allowed"),
])
def test_filter_refuses(neurons, expr, words):
    with pytest.raises(UserError) as e:
        filter_rows(neurons, expr)
    message = str(e.value)
    assert words in message
    assert "\n" not in message and "\r" not in message
    assert message.endswith("columns: layer, frac, pos_type, token_detector, dead, triggers, tok")


# --- nullable values (None: "not known") ---------------------------------------------------------


def nullable_table() -> Table:
    return Table({
        "layer": [0, 1, 2, 3, 4, 5],
        "flag": [True, False, None, True, None, False],
        "score": [0.5, None, 2.0, None, 3.0, -0.0],
        "count": [None, 1, 2, 3, None, 0],
        "nan_or_none": [math.nan, None, math.inf, 1.0, None, 2.0],
        "unknown": [None] * 6,  # only None: the kind must be given
        "tok": ["=a", "", "b", "'", "c", "d"],
    }, kinds={"unknown": "bool"})


def test_nullable_storage():
    t = nullable_table()
    assert t.kinds == {"layer": "int", "flag": "bool", "score": "float", "count": "int", "nan_or_none": "float",
                       "unknown": "bool", "tok": "str"}
    for name in ("flag", "score", "count", "unknown"):
        assert t[name].dtype == object and t.has_none(name)
    assert t["layer"].dtype == np.int64 and not t.has_none("layer") and not t.has_none("tok")
    row = list(t.rows())[1]
    assert row["flag"] is False and row["score"] is None and type(row["count"]) is int
    assert [r["flag"] for r in t.rows()] == [True, False, None, True, None, False]
    # without None a numeric column is a plain numpy array again
    known = t.take([0, 1, 3])
    assert known["flag"].dtype == bool and known.kind("flag") == "bool"
    assert known["count"].dtype == object  # row 0's count is None
    assert t.take([1, 2])["count"].dtype == np.int64
    assert Table({"x": [1, None]}, kinds={"x": "float"})["x"].tolist() == [1.0, None]
    assert Table({"x": [1, 2]}, kinds={"x": "float"})["x"].dtype == np.float64
    # concat keeps None and widens int + float
    both = concat([t.take([1, 2]), t.take([0])])
    assert both["count"].tolist() == [1, 2, None] and both.kind("count") == "int"
    assert concat([Table({"x": [1]}), Table({"x": [None, 2.5]})])["x"].tolist() == [1.0, None, 2.5]
    # str and list columns are not nullable; a column of only None needs its kind
    for bad in ({"s": ["a", None]}, {"l": [["a"], None]}, {"n": [None, None]}):
        with pytest.raises(ValueError):
            Table(bad)
    with pytest.raises(ValueError):
        Table({"x": [1.5, None]}, kinds={"x": "int"})


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_nullable_round_trip(tmp_path, fmt):
    _, back, want = _export_and_read(nullable_table(), tmp_path, fmt)
    assert len(back) == len(want)
    for got, exp in zip(back, want):
        assert list(got) == list(exp)
        for name in exp:
            g, e = got[name], exp[name]
            assert type(g) is type(e), (name, g, e)
            if isinstance(e, float) and math.isnan(e):
                assert math.isnan(g)  # NaN is a value, not None
            else:
                assert g == e, (name, g, e)
    assert back[1]["score"] is None and back[0]["nan_or_none"] is not None
    assert [r["flag"] for r in back] == [True, False, None, True, None, False]  # None never reads as False


def test_nullable_in_each_file(tmp_path):
    t = nullable_table()
    export(t, tmp_path / "t.csv", "csv")
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["layer", "flag", "score", "count", "nan_or_none", "unknown", "tok"]
    assert rows[3] == ["2", "", "2.0", "2", "inf", "", "b"]  # None is an empty cell
    assert rows[2][-1] == ""  # an empty string stays an empty string
    export(t, tmp_path / "t.jsonl", "jsonl")
    first = (tmp_path / "t.jsonl").read_text(encoding="utf-8").split("\n")[0]
    assert json.loads(first)["count"] is None and '"count": null' in first
    export(t, tmp_path / "t.md", "markdown")
    md = (tmp_path / "t.md").read_text(encoding="utf-8").split("\n")
    assert md[4] == "| 2 |  | 2.0 | 2 | inf |  | b |"


def test_nullable_parquet_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    export(nullable_table(), path, "parquet")
    arrow = pq.read_table(path)
    assert [arrow.schema.field(n).type for n in ("flag", "score", "count", "unknown")] == \
        [pa.bool_(), pa.float64(), pa.int64(), pa.bool_()]
    assert [arrow.column(n).null_count for n in ("layer", "flag", "score", "count", "nan_or_none", "unknown")] == \
        [0, 2, 2, 2, 2, 6]


def test_csv_header_is_bare_names(tmp_path):
    t = Table({"layer": [1], "neuron": [7], "=cmd": ["x"], "'q": [True], "a,b": [0.5]})
    path = tmp_path / "t.csv"
    export(t, path, "csv")
    header = path.read_bytes().decode("utf-8").split("\r\n")[0]
    assert header == "layer,neuron,'=cmd,''q,\"a,b\""  # names only, still formula-guarded
    assert read_back(path, "csv", t.kinds) == [{"layer": 1, "neuron": 7, "=cmd": "x", "'q": True, "a,b": 0.5}]
    # kinds given in another order still match by name
    shuffled = dict(reversed(list(t.kinds.items())))
    assert read_back(path, "csv", shuffled) == list(t.rows())


def test_read_back_kinds(tmp_path):
    t = nullable_table()
    for fmt in ("csv", "jsonl", "parquet"):
        export(t, tmp_path / f"t.{fmt}", fmt)
    bad_cases = [
        ("csv", None, "needs its column kinds"),
        ("csv", {"layer": "int"}, "the kinds given name"),
        ("csv", {**t.kinds, "layer": "bool"}, "is not a bool value"),
        ("csv", {**t.kinds, "layer": "number"}, "unknown column kind"),
        ("jsonl", {**t.kinds, "extra": "int"}, "the kinds given name"),
        ("jsonl", {**t.kinds, "layer": "float"}, "is not a float value"),
        ("jsonl", {**t.kinds, "tok": "int"}, "is not a int value"),
        ("parquet", {**t.kinds, "count": "float"}, "not float"),
    ]
    for fmt, kinds, words in bad_cases:
        with pytest.raises(UserError) as e:
            read_back(tmp_path / f"t.{fmt}", fmt, kinds)
        assert words in str(e.value) and "\n" not in str(e.value), (fmt, kinds, str(e.value))


@pytest.fixture
def nullable() -> Table:
    return nullable_table()


@pytest.mark.parametrize("expr, want", [
    # a bare nullable bool column is true only where True; `not` only where False; None rows match neither
    ("flag", [0, 3]),
    ("not flag", [1, 5]),
    ("flag or not flag", [0, 1, 3, 5]),
    ("flag == true", [0, 3]),
    ("flag != true", [1, 5]),
    ("flag == false", [1, 5]),
    ("flag in (true,)", [0, 3]),
    ("unknown", []),
    ("not unknown", []),
    # a comparison involving None is never true, nor is its negation (SQL's unknown)
    ("score > 1", [2, 4]),
    ("score <= 1", [0, 5]),
    ("not (score > 1)", [0, 5]),
    ("score != 2", [0, 4, 5]),
    ("0 <= count < 3", [1, 2, 5]),
    ("-count < -1", [2, 3]),
    ("count in (1, 2)", [1, 2]),
    ("count not in (1, 2)", [3, 5]),
    ("count == score", [2, 5]),  # 0 == -0.0
    ("nan_or_none != 1", [0, 2, 5]),  # NaN is a value: NaN != 1 holds
    ("flag == none", []),  # use missing(flag)
    ("flag != none", []),
    ("layer == none", []),
    # and / or decide where the known part suffices
    ("flag or score > 1", [0, 2, 3, 4]),
    ("not flag and count > 0", [1]),
    ("false and flag", []),
    ("not (false and flag)", [0, 1, 2, 3, 4, 5]),
    ("true or unknown", [0, 1, 2, 3, 4, 5]),
    ("not (true or unknown)", []),
    # known / missing
    ("known(flag)", [0, 1, 3, 5]),
    ("missing(flag)", [2, 4]),
    ("not known(flag)", [2, 4]),
    ("flag or missing(flag)", [0, 2, 3, 4]),
    ("missing(score) or missing(count)", [0, 1, 3, 4]),
    ("known(score) and score < 1", [0, 5]),
    ("missing(unknown)", [0, 1, 2, 3, 4, 5]),
    ("known(layer)", [0, 1, 2, 3, 4, 5]),
    ("missing(tok)", []),
    ("layer > 2 or missing(score)", [1, 3, 4, 5]),
])
def test_filter_with_none(nullable, expr, want):
    assert rows_of(nullable, expr) == want


@pytest.mark.parametrize("expr, words", [
    ("count", "not a condition"),
    ("score < none", "none can only be compared"),
    ("count in (1, none)", "cannot look for"),
    ("known(1)", "write known(column)"),
    ("missing(true)", "needs a column"),
    ("known(flag, 1)", "write known(column)"),
    ("known(nope)", "unknown column 'nope'"),
    ("isnull(flag)", "not allowed"),
])
def test_filter_with_none_refuses(nullable, expr, words):
    with pytest.raises(UserError) as e:
        filter_rows(nullable, expr)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_filter_leaves_nullable_columns_alone(nullable):
    before = nullable["flag"].tolist()
    mask = filter_rows(nullable, "flag or missing(flag)")
    mask[:] = False
    assert nullable["flag"].tolist() == before
    assert rows_of(nullable.take(filter_rows(nullable, "known(flag)")), "not flag") == [1, 3]
