"""Text sources and packing them into full-length token sequences.

A source spec is one of:
- `builtin`: the built-in corpus (`engine.data.builtin`), already mixed and shuffled (the word wins over
  a file of that name);
- a `.jsonl` file: one JSON object per line, the text under `field`; blank lines are skipped;
- a `.jsonl.gz` or `.jsonl.zst` file: the same, compressed, decompressed as a stream (zstd needs
  the `zstandard` package, or `compression.zstd` on Python >= 3.14; it is not a dependency);
- a `.parquet` file: the text in column `field`, read batch by batch;
- a Hugging Face `datasets` directory written by `save_to_disk` (it has `state.json`): its
  `data-*.arrow` files (Arrow IPC streams) read batch by batch with pyarrow, the text in column
  `field` (the `datasets` package is not needed);
- a directory: every regular file below it (sorted; hidden names and files that look binary are
  skipped, the binary ones counted in `notes`), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and `.parquet`
  files read as such, the rest as text;
- any other file: plain text, one document.

Domain of a document: the JSONL object's "domain" key, or the row's "domain" column, when present;
else, for a file inside a directory source, the first folder below that directory (so
`data/code/x.py` is "code") or the directory's own name for files directly in it; else the file's
name without its format suffixes (a dataset directory's name).

Compressed JSONL, parquet and datasets cannot be read at any document cheaply, so they are read
in passes: the shuffled order is taken in windows of growing size, and one pass over such a source
collects the window's documents from it (stopping at the last one needed).

The documents of all user sources are shuffled together with `random.Random(seed)` (so the first
tokens sample all the data) and come first, then the built-in corpus if named.
"""

import gzip
import io
import json
import os
import platform
import random
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from contextlib import closing
from typing import BinaryIO

import numpy as np

from ffnscope.cache.errors import UserError

_SNIFF_BYTES = 8192
_KINDS_HINT = ("give a text file, a directory, a .jsonl (.jsonl.gz, .jsonl.zst) or .parquet file, "
               "a saved Hugging Face dataset directory, or 'builtin'")
_WINDOW_FIRST = 1 << 10  # documents of the shuffled order fetched in the first pass over streamed sources
_WINDOW_MAX = 1 << 16
_PARQUET_BATCH = 1024
# Suffixes of the formats read as streams, and the kind each is described as.
_STREAMED_SUFFIXES = {(".jsonl", ".gz"): "jsonl.gz", (".jsonl", ".zst"): "jsonl.zst", (".parquet",): "parquet"}


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    source: str


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _streamed_kind(path: Path) -> str | None:
    """'jsonl.gz', 'jsonl.zst' or 'parquet' for files read as streams, else None."""
    suffixes = tuple(s.lower() for s in path.suffixes)
    for ending, kind in _STREAMED_SUFFIXES.items():
        if suffixes[-len(ending):] == ending:
            return kind
    return None


def _is_dataset_dir(path: Path) -> bool:
    return (path / "state.json").is_file()


def _stem(path: Path) -> str:
    """The file name without its format suffixes: data.jsonl.gz -> data."""
    kind = _streamed_kind(path)
    return path.name[: -len(kind) - 1] if kind else path.stem


def _decode(data: bytes) -> tuple[str, bool]:
    """Text and whether it was valid UTF-8 (else undecodable bytes become U+FFFD)."""
    try:
        return data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", errors="replace"), False


class _Source:
    """Documents that can be loaded one by one, by index, in any order."""

    def __init__(self, spec: str, notes: list[str]) -> None:
        self.spec = spec
        self._notes = notes
        self._noted_bad_utf8 = False

    def _text(self, data: bytes, where: str) -> str:
        text, valid = _decode(data)
        if not valid and not self._noted_bad_utf8:
            self._noted_bad_utf8 = True
            first = "" if Path(where) == Path(self.spec) else f" (first: {where})"
            self._notes.append(f"{self.spec}: not valid UTF-8{first}, decoded with replacement characters")
        return text

    def close(self) -> None:
        pass


class _TextFiles(_Source):
    """Plain text files, one document each."""

    def __init__(self, spec: str, notes: list[str], files: list[Path], domains: list[str]) -> None:
        super().__init__(spec, notes)
        self.files, self.domains = files, domains
        self.count = len(files)

    def load(self, k: int) -> Document:
        path = str(self.files[k])
        return Document(self._text(self.files[k].read_bytes(), path), self.domains[k], path)


class _JsonLines(_Source):
    """One JSONL file; only the byte offsets of its lines are held, each line is read when needed."""

    def __init__(self, spec: str, notes: list[str], path: Path, field: str, domain: str) -> None:
        super().__init__(spec, notes)
        self.path, self.field, self.domain = path, field, domain
        self.offsets = _line_offsets(path)
        self.count = len(self.offsets)
        self._file: BinaryIO | None = None

    def load(self, k: int) -> Document:
        if self._file is None:
            self._file = open(self.path, "rb")
        offset = int(self.offsets[k])
        self._file.seek(offset)
        line = self._text(self._file.readline(), self.spec)
        text, domain = _json_record(line, self.path, lambda: self._line_number(offset), self.field)
        return Document(text, domain or self.domain, f"{self.path}#{k + 1}")

    def _line_number(self, offset: int) -> int:
        # Only needed for error messages, so counting the newlines again is fine.
        newlines = 0
        with open(self.path, "rb") as f:
            while offset > 0 and (chunk := f.read(min(offset, 1 << 24))):
                newlines += chunk.count(b"\n")
                offset -= len(chunk)
        return newlines + 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _json_record(line: str, path: Path, line_number, field: str) -> tuple[str, str | None]:
    """Text and domain (None if none) of one JSONL line; `line_number()` is only called for errors."""
    if not line.strip():
        return "", None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(
            f"{path} line {line_number()} is not valid JSON; "
            "each line must hold one JSON object (or give the file a .txt name to read it as text)"
        ) from None
    text = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        keys = ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, dict) else None
        found = "not an object" if keys is None else f"keys: {keys or 'none'}"
        raise UserError(
            f"{path} line {line_number()} has no text field '{field}' "
            f"({found}); name the text field with --field"
        )
    domain = obj.get("domain")
    return text, (str(domain) if domain not in (None, "") else None)


class _Streamed(_Source):
    """Documents that can only be read in order: `fetch` collects some of them in one pass."""

    def __init__(self, spec: str, notes: list[str], path: Path, domain: str) -> None:
        super().__init__(spec, notes)
        self.path, self.domain = path, domain
        self.count = 0

    def _records(self) -> Iterator[tuple[str, str | None]]:
        """(text, domain or None) of every document, in order."""
        raise NotImplementedError

    def fetch(self, wanted: set[int]) -> dict[int, Document]:
        found: dict[int, Document] = {}
        last = max(wanted)
        with closing(self._records()) as records:
            for k, (text, domain) in enumerate(records):
                if k in wanted:
                    found[k] = Document(text, domain or self.domain, f"{self.path}#{k + 1}")
                if k >= last:
                    break
        if len(found) < len(wanted):
            raise UserError(f"{self.path} changed while it was read; start again")
        return found


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _zstd_open(path: Path) -> BinaryIO:
    try:
        from compression import zstd  # Python >= 3.14
    except ImportError:
        try:
            import zstandard
        except ImportError:
            raise UserError(
                f"{path}: reading .jsonl.zst needs a zstd decompressor; pip install zstandard "
                "(or decompress it, or use Python >= 3.14)"
            ) from None
        raw = open(path, "rb")
        try:
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
        except BaseException:
            raw.close()
            raise
    return zstd.open(path, "rb")


class _CompressedJsonLines(_Streamed):
    """A gzip or zstd compressed JSONL file, decompressed as a stream (once to count its lines)."""

    def __init__(self, spec: str, notes: list[str], path: Path, field: str, domain: str, kind: str) -> None:
        super().__init__(spec, notes, path, domain)
        self.field = field
        self._open_stream = (lambda: gzip.open(path, "rb")) if kind == "jsonl.gz" else (lambda: _zstd_open(path))
        try:
            with self._open_stream() as f:
                self.count = _count_lines(f)
        except (gzip.BadGzipFile, EOFError, ValueError, zlib.error) as e:
            raise UserError(f"{path} is not a readable {kind} file: {_one_line(e)}") from None
        except Exception as e:
            if type(e).__name__ == "ZstdError":  # zstandard's and compression.zstd's
                raise UserError(f"{path} is not a readable {kind} file: {_one_line(e)}") from None
            raise

    def _records(self) -> Iterator[tuple[str, str | None]]:
        with self._open_stream() as f:
            number = 0
            for raw in f:
                number += 1
                body = raw[:-1] if raw.endswith(b"\n") else raw
                if body:  # as in plain JSONL, empty lines are not documents
                    yield _json_record(self._text(body, self.spec), self.path, lambda: number, self.field)


def _count_lines(f: BinaryIO) -> int:
    """Non-empty lines of a stream (as `_line_offsets` counts them), read in chunks."""
    count, after_newline = 0, True
    while chunk := f.read(1 << 24):
        newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A)
        if len(newlines):
            count += int(newlines[0] > 0 or not after_newline) + int(np.count_nonzero(np.diff(newlines) > 1))
            after_newline = int(newlines[-1]) == len(chunk) - 1
        else:
            after_newline = False
    return count + (not after_newline)


def _text_column(schema, path: Path, field: str, what: str = "") -> list[str]:
    """The columns to read (text, then domain if the schema has one); a one-line error if none."""
    import pyarrow as pa

    names = list(schema.names)
    if field not in names:
        have = ", ".join(map(repr, names[:20])) + (", ..." if len(names) > 20 else "")
        raise UserError(f"{path}{what} has no text column '{field}' (columns: {have or 'none'}); "
                        "name the text column with --field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"{path}{what}: column '{field}' holds {kind}, not text; name the text column with --field")
    return [field, "domain"] if "domain" in names and field != "domain" else [field]


def _batch_records(batch, columns: list[str]) -> Iterator[tuple[str, str | None]]:
    texts = batch.column(columns[0]).to_pylist()
    domains = batch.column(columns[1]).to_pylist() if len(columns) > 1 else [None] * len(texts)
    for text, domain in zip(texts, domains):
        yield text or "", (str(domain) if domain not in (None, "") else None)


class _Parquet(_Streamed):
    """A parquet file: the text column (and `domain`, if there is one) read batch by batch."""

    def __init__(self, spec: str, notes: list[str], path: Path, field: str, domain: str) -> None:
        import pyarrow.parquet as pq

        super().__init__(spec, notes, path, domain)
        try:
            meta = pq.ParquetFile(path)
        except Exception as e:  # pyarrow's ArrowInvalid and friends
            if isinstance(e, OSError) and e.errno is not None:
                raise
            raise UserError(f"{path} is not a readable parquet file: {_one_line(e)}") from None
        with meta:
            self.columns = _text_column(meta.schema_arrow, path, field)
            self.count = meta.metadata.num_rows

    def _records(self) -> Iterator[tuple[str, str | None]]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as f:
            for batch in f.iter_batches(batch_size=_PARQUET_BATCH, columns=self.columns):
                yield from _batch_records(batch, self.columns)


class _ArrowDataset(_Streamed):
    """A Hugging Face `datasets` directory from `save_to_disk`: its Arrow IPC stream files, read
    batch by batch from memory maps (the `datasets` package is not needed)."""

    def __init__(self, spec: str, notes: list[str], root: Path, field: str, domain: str) -> None:
        super().__init__(spec, notes, root, domain)
        try:
            state = json.loads((root / "state.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{root}/state.json is not valid JSON ({_one_line(e)}); "
                            f"is {root} a saved dataset?") from None
        listed = state.get("_data_files") if isinstance(state, dict) else None
        if isinstance(listed, list) and listed and all(isinstance(d, dict) and "filename" in d for d in listed):
            self.files = [root / str(d["filename"]) for d in listed]
        else:
            self.files = sorted(root.glob("data-*.arrow"))
        if not self.files:
            raise UserError(f"{root} has a state.json but no data-*.arrow files; is it a saved dataset "
                            "(a DatasetDict keeps each split in a folder: give the split's folder)?")
        self.fingerprint = state.get("_fingerprint") if isinstance(state, dict) else None
        self.size = 0
        self.columns: list[str] = []
        for path in self.files:
            self.size += path.stat().st_size
            with self._reader(path) as reader:
                columns = _text_column(reader.schema, path, field)
                self.columns = self.columns or columns
                if columns != self.columns:
                    raise UserError(f"{path} has columns {columns}, unlike {self.files[0]} ({self.columns})")
                try:
                    self.count += sum(batch.num_rows for batch in reader)
                except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid, ArrowIOError
                    if isinstance(e, OSError) and e.errno is not None:
                        raise
                    raise UserError(f"{path} is a damaged Arrow IPC stream: {_one_line(e)}") from None

    @staticmethod
    def _reader(path: Path):
        import pyarrow as pa

        try:
            return pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid as e:
            raise UserError(f"{path} is not an Arrow IPC stream ({_one_line(e)}); "
                            "is it from datasets' save_to_disk?") from None

    def _records(self) -> Iterator[tuple[str, str | None]]:
        for path in self.files:
            with self._reader(path) as reader:
                for batch in reader:
                    yield from _batch_records(batch, self.columns)


def _line_offsets(path: Path) -> np.ndarray:
    """Byte offsets of the non-empty lines of a file, scanned in chunks so any size fits."""
    newlines, size = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 26):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A) + size)
            size += len(chunk)
    ends = np.concatenate([*newlines, [size]]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return starts[ends > starts]


class Sources:
    """Opened data sources: their documents, their provenance, and messages for the user.

    `notes` grows while documents are read (a non-UTF-8 file is only found when read), so show
    it after packing. Each problem is noted once per source.
    """

    def __init__(self, specs: list[str], field: str, seed: int) -> None:
        if not specs:
            raise UserError(f"no data source given; {_KINDS_HINT}")
        self.notes: list[str] = []
        self.seed = seed
        self._specs = list(dict.fromkeys(specs))
        self._builtin = "builtin" in self._specs
        self._sources: list[_TextFiles | _JsonLines | _Streamed] = []
        self._described: list[dict] = []
        for spec in self._specs:
            try:
                self._open(spec, field)
            except OSError as e:
                raise UserError(
                    f"cannot read {e.filename or spec}: {e.strerror or e}; check its permissions"
                ) from None

    def _open(self, spec: str, field: str) -> None:
        path = Path(spec)
        if spec == "builtin":
            self._described.append({"kind": "builtin", "path": "builtin", "size": None,
                                    "documents": None, "python": platform.python_version()})
        elif path.is_dir() and _is_dataset_dir(path):
            source = _ArrowDataset(spec, self.notes, path, field, path.resolve().name or "data")
            self._sources.append(source)
            self._described.append({"kind": "hf-dataset", "path": str(path.resolve()), "size": source.size,
                                    "documents": source.count, "fingerprint": source.fingerprint})
        elif path.is_dir():
            self._open_directory(spec, path, field)
        elif path.is_file() and (kind := _streamed_kind(path)):
            source = self._streamed(spec, path, field, _stem(path), kind)
            self._sources.append(source)
            self._described.append({"kind": kind, "path": str(path.resolve()), "size": path.stat().st_size,
                                    "documents": source.count})
        elif path.is_file():
            if _looks_binary(path):
                raise UserError(
                    f"{spec} looks binary (NUL bytes); give text, JSONL or a directory of text files"
                )
            if _is_jsonl(path):
                source: _TextFiles | _JsonLines | _Streamed = _JsonLines(spec, self.notes, path, field, path.stem)
            else:
                source = _TextFiles(spec, self.notes, [path], [path.stem])
            self._sources.append(source)
            self._described.append({"kind": "jsonl" if _is_jsonl(path) else "text",
                                    "path": str(path.resolve()), "size": path.stat().st_size,
                                    "documents": source.count})
        else:
            raise UserError(f"data source not found: {spec}; {_KINDS_HINT}")

    def _streamed(self, spec: str, path: Path, field: str, domain: str, kind: str) -> _Streamed:
        if kind == "parquet":
            return _Parquet(spec, self.notes, path, field, domain)
        return _CompressedJsonLines(spec, self.notes, path, field, domain, kind)

    def _open_directory(self, spec: str, root: Path, field: str) -> None:
        own_name = root.resolve().name or "data"
        texts, domains, opened = [], [], []
        size = binary = 0
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                path = Path(folder, name)
                if name.startswith(".") or not path.is_file():
                    continue
                below = path.relative_to(root).parts
                domain = below[0] if len(below) > 1 else own_name
                if kind := _streamed_kind(path):
                    size += path.stat().st_size
                    opened.append(self._streamed(str(path), path, field, domain, kind))
                    continue
                if _looks_binary(path):
                    binary += 1
                    continue
                size += path.stat().st_size
                if _is_jsonl(path):
                    opened.append(_JsonLines(str(path), self.notes, path, field, domain))
                else:
                    texts.append(path)
                    domains.append(domain)
        opened.append(_TextFiles(spec, self.notes, texts, domains))
        self._sources += opened
        self._described.append({"kind": "directory", "path": str(root.resolve()), "size": size,
                                "documents": sum(s.count for s in opened), "skipped_binary": binary})
        if binary:
            self.notes.append(f"{spec}: skipped {binary} binary file{'s' if binary > 1 else ''}")

    def describe(self) -> list[dict]:
        """One JSON-able record per source (kind, path, size in bytes, documents) for provenance."""
        return [dict(d) for d in self._described]

    def documents(self) -> Iterator[Document]:
        """User documents in an order shuffled with the seed, then the built-in corpus if named.
        Empty and whitespace-only documents are left out."""
        ends = list(accumulate(s.count for s in self._sources))
        order = array("q", range(ends[-1] if ends else 0))  # 8 bytes a document, however many
        random.Random(self.seed).shuffle(order)
        found_text = False
        try:
            for doc in self._in_order(order, ends):
                if doc.text and not doc.text.isspace():
                    found_text = True
                    yield doc
        finally:
            for source in self._sources:
                source.close()
        if self._builtin:
            from ffnscope.engine.data.builtin import builtin_documents  # here: engine.data.builtin imports this module

            yield from builtin_documents(self.seed)
        elif not found_text:
            raise UserError(f"no text in the data ({', '.join(self._specs)}): every document is "
                            "empty or whitespace; give files that contain text")


    def _in_order(self, order: array, ends: list[int]) -> Iterator[Document]:
        """The documents at the indices of `order`. Streamed sources are read in one pass per window
        of the order, the windows growing so that a short recording reads little."""
        if not any(isinstance(s, _Streamed) for s in self._sources):
            for index in order:
                i = bisect_right(ends, index)
                yield self._sources[i].load(index - (ends[i - 1] if i else 0))
            return
        start, window = 0, _WINDOW_FIRST
        while start < len(order):
            located = []
            for index in order[start:start + window]:
                i = bisect_right(ends, index)
                located.append((i, index - (ends[i - 1] if i else 0)))
            start += window
            window = min(2 * window, _WINDOW_MAX)
            wanted: dict[int, set[int]] = {}
            for i, k in located:
                if isinstance(self._sources[i], _Streamed):
                    wanted.setdefault(i, set()).add(k)
            fetched = {i: self._sources[i].fetch(ks) for i, ks in wanted.items()}
            for i, k in located:
                yield fetched[i][k] if i in fetched else self._sources[i].load(k)


def open_sources(specs: list[str], field: str = "text", seed: int = 0) -> Sources:
    """Open data sources (see the module docstring); bad input raises a one-line UserError."""
    return Sources(specs, field, seed)


