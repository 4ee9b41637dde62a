"""Writing tables to CSV, JSONL, Parquet and Markdown, and reading them back exactly."""
from __future__ import annotations

import csv
import json
import os
import secrets
from pathlib import Path
from typing import Any, Mapping, Sequence

from ffnscope.cache.atomic import replaced_file, same_file
from ffnscope.cache.errors import UserError
from ffnscope.engine.safe_text import printable
from ffnscope.engine.table.table import _NUMERIC, FORMATS, KINDS, Table

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


def arrow_table(table: Table):
    """The table as a pyarrow.Table, with the kinds' Arrow types (None as null)."""
    _import_pyarrow()
    import pyarrow as pa

    types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(),
             "list": pa.list_(pa.string())}
    arrays = [pa.array(table[n].tolist(), type=types[table.kind(n)]) for n in table.columns]
    return pa.Table.from_arrays(arrays, names=table.columns)


def _import_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError("Parquet and Arrow need pyarrow; install it with: pip install pyarrow") from None


def _check_fmt(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return fmt


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0 of every file h5py writes (a recording, an NPL sidecar)


def check_out(path: str | os.PathLike, force: bool = False, sources=()) -> None:
    """Where an export may go: never over a recording, whatever `force`: not one of `sources` (the recording
    exported from, by its name, a symlink or a hard link) nor any HDF5 file (another recording, a sidecar);
    over another existing file only with `force`. UserError (one line) otherwise."""
    path = Path(path)
    if any(same_file(path, source) for source in sources):
        raise UserError(f"{path} is the recording being exported (or a link to it); choose another file for the "
                        "table")
    try:
        with open(path, "rb") as f:
            hdf5 = f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        hdf5 = False
    if hdf5:
        raise UserError(f"{path} is an HDF5 file (a recording or its NPL maps), never replaced by an export; "
                        "choose another file for the table")
    if not force and os.path.lexists(path):
        raise UserError(f"{path} exists; add --force to replace it, or choose another file")


def export(table: Table, path: str | os.PathLike, fmt: str) -> None:
    """Write `table` to `path` as csv, jsonl, parquet or markdown, whole (cache.atomic: a temporary file
    beside the target, renamed over it), so readers never see half a file. Errors raise UserError (one line).
    It replaces a file at `path` (check_out first to ask), never a recording.
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
    check_out(path, force=True)
    # the one writer of our files; a random tag keeps two exports of one file in one process apart
    binary = fmt == "parquet"
    open_args = {} if binary else {"encoding": "utf-8", "newline": "" if fmt == "csv" else "\n"}
    with replaced_file(path, "wb" if binary else "w", f".{secrets.token_hex(4)}", f"cannot write {path}",
                       **open_args) as f:
        if binary:
            import pyarrow.parquet as pq

            pq.write_table(arrow_table(table), f)
        else:  # csv: the csv module writes its own line ends; jsonl/markdown: always \n
            {"csv": _write_csv, "jsonl": _write_jsonl, "markdown": _write_markdown}[fmt](table, f)


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
