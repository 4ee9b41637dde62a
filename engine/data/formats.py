"""The readers of each data format (`engine.data.sources` says which spec opens which): plain text
files, JSONL, compressed JSONL, parquet and saved Hugging Face datasets. A reader gives records
(text, domain, source), the fields of a `sources.Document`: by index (`load`) for the formats that can
be read at any document cheaply, in one pass for a set of indices (`fetch`, the `Streamed` ones) for
the others."""

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ffnscope.cache.errors import UserError

_SNIFF_BYTES = 8192
_PARQUET_BATCH = 1024
# Suffixes of the formats read as streams, and the kind each is described as.
_STREAMED_SUFFIXES = {(".jsonl", ".gz"): "jsonl.gz", (".jsonl", ".zst"): "jsonl.zst", (".parquet",): "parquet"}

Record = tuple[str, str, str]  # text, domain, source


def looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def streamed_kind(path: Path) -> str | None:
    """'jsonl.gz', 'jsonl.zst' or 'parquet' for files read as streams, else None."""
    suffixes = tuple(s.lower() for s in path.suffixes)
    for ending, kind in _STREAMED_SUFFIXES.items():
        if suffixes[-len(ending):] == ending:
            return kind
    return None


def is_dataset_dir(path: Path) -> bool:
    return (path / "state.json").is_file()


def format_stem(path: Path) -> str:
    """The file name without its format suffixes: data.jsonl.gz -> data."""
    kind = streamed_kind(path)
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


class TextFiles(_Source):
    """Plain text files, one document each."""

    def __init__(self, spec: str, notes: list[str], files: list[Path], domains: list[str]) -> None:
        super().__init__(spec, notes)
        self.files, self.domains = files, domains
        self.count = len(files)

    def load(self, k: int) -> Record:
        path = str(self.files[k])
        return self._text(self.files[k].read_bytes(), path), self.domains[k], path


class JsonLines(_Source):
    """One JSONL file; only the byte offsets of its lines are held, each line is read when needed."""

    def __init__(self, spec: str, notes: list[str], path: Path, field: str, domain: str) -> None:
        super().__init__(spec, notes)
        self.path, self.field, self.domain = path, field, domain
        self.offsets = _line_offsets(path)
        self.count = len(self.offsets)
        self._file: BinaryIO | None = None

    def load(self, k: int) -> Record:
        if self._file is None:
            self._file = open(self.path, "rb")
        offset = int(self.offsets[k])
        self._file.seek(offset)
        line = self._text(self._file.readline(), self.spec)
        text, domain = _json_record(line, self.path, lambda: self._line_number(offset), self.field)
        return text, domain or self.domain, f"{self.path}#{k + 1}"

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


class Streamed(_Source):
    """Documents that can only be read in order: `fetch` collects some of them in one pass."""

    def __init__(self, spec: str, notes: list[str], path: Path, domain: str) -> None:
        super().__init__(spec, notes)
        self.path, self.domain = path, domain
        self.count = 0

    def _records(self) -> Iterator[tuple[str, str | None]]:
        """(text, domain or None) of every document, in order."""
        raise NotImplementedError

    def fetch(self, wanted: set[int]) -> dict[int, Record]:
        found: dict[int, Record] = {}
        last = max(wanted)
        with closing(self._records()) as records:
            for k, (text, domain) in enumerate(records):
                if k in wanted:
                    found[k] = text, domain or self.domain, f"{self.path}#{k + 1}"
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


class CompressedJsonLines(Streamed):
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


class Parquet(Streamed):
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


class ArrowDataset(Streamed):
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


def open_streamed(spec: str, notes: list[str], path: Path, field: str, domain: str, kind: str) -> Streamed:
    """The reader of a file `streamed_kind` calls `kind`."""
    if kind == "parquet":
        return Parquet(spec, notes, path, field, domain)
    return CompressedJsonLines(spec, notes, path, field, domain, kind)


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

