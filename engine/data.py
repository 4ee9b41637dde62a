"""Text sources and packing them into full-length token sequences.

A source spec is one of:
- `builtin`: the built-in corpus (`engine.corpus`), already mixed and shuffled (the word wins over
  a file of that name);
- a `.jsonl` file: one JSON object per line, the text under `field`; blank lines are skipped;
- a directory: every regular file below it (sorted; hidden names and files that look binary are
  skipped, the binary ones counted in `notes`), `.jsonl` files read as JSONL, the rest as text;
- any other file: plain text, one document.

Domain of a document: the JSONL object's "domain" key when present; else, for a file inside a
directory source, the first folder below that directory (so `data/code/x.py` is "code") or the
directory's own name for files directly in it; else the file's stem.

The documents of all user sources are shuffled together with `random.Random(seed)` (so the first
tokens sample all the data) and come first, then the built-in corpus if named.
"""

import hashlib
import json
import os
import platform
import random
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ffnscope.cache.errors import UserError

_SNIFF_BYTES = 8192
_BATCH_DOCS = 256
_BATCH_CHARS = 1 << 18
_KINDS_HINT = "give a text file, a directory, a .jsonl file or 'builtin'"


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
        if not line.strip():
            return Document("", self.domain, f"{self.path}#{k + 1}")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(
                f"{self.path} line {self._line_number(offset)} is not valid JSON; "
                "each line must hold one JSON object (or give the file a .txt name to read it as text)"
            ) from None
        text = obj.get(self.field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            keys = ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, dict) else None
            found = "not an object" if keys is None else f"keys: {keys or 'none'}"
            raise UserError(
                f"{self.path} line {self._line_number(offset)} has no text field '{self.field}' "
                f"({found}); name the text field with --field"
            )
        domain = obj.get("domain")
        domain = str(domain) if domain not in (None, "") else self.domain
        return Document(text, domain, f"{self.path}#{k + 1}")

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
        self._sources: list[_TextFiles | _JsonLines] = []
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
        elif path.is_dir():
            self._open_directory(spec, path, field)
        elif path.is_file():
            if _looks_binary(path):
                raise UserError(
                    f"{spec} looks binary (NUL bytes); give text, JSONL or a directory of text files"
                )
            if _is_jsonl(path):
                source: _TextFiles | _JsonLines = _JsonLines(spec, self.notes, path, field, path.stem)
            else:
                source = _TextFiles(spec, self.notes, [path], [path.stem])
            self._sources.append(source)
            self._described.append({"kind": "jsonl" if _is_jsonl(path) else "text",
                                    "path": str(path.resolve()), "size": path.stat().st_size,
                                    "documents": source.count})
        else:
            raise UserError(f"data source not found: {spec}; {_KINDS_HINT}")

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
                if _looks_binary(path):
                    binary += 1
                    continue
                below = path.relative_to(root).parts
                domain = below[0] if len(below) > 1 else own_name
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
            for index in order:
                i = bisect_right(ends, index)
                doc = self._sources[i].load(index - (ends[i - 1] if i else 0))
                if doc.text and not doc.text.isspace():
                    found_text = True
                    yield doc
        finally:
            for source in self._sources:
                source.close()
        if self._builtin:
            from ffnscope.engine.corpus import builtin_documents  # here: engine.corpus imports this module

            yield from builtin_documents(self.seed)
        elif not found_text:
            raise UserError(f"no text in the data ({', '.join(self._specs)}): every document is "
                            "empty or whitespace; give files that contain text")


def open_sources(specs: list[str], field: str = "text", seed: int = 0) -> Sources:
    """Open data sources (see the module docstring); bad input raises a one-line UserError."""
    return Sources(specs, field, seed)


@dataclass
class Packed:
    tokens: np.ndarray  # (n, seq_len) int32
    domains: np.ndarray  # (n, seq_len) uint8, index into domain_names
    domain_names: list[str]
    n_documents: int  # documents with at least one token in `tokens`
    short: bool  # the data held fewer than the n_seqs sequences asked for

    def fingerprint(self) -> str:
        """sha256 of the packed data: equal packings give equal fingerprints."""
        h = hashlib.sha256(f"seq_len={self.tokens.shape[1]};domains={self.domain_names}".encode())
        h.update(np.ascontiguousarray(self.tokens, dtype="<i4").tobytes())
        h.update(np.ascontiguousarray(self.domains, dtype=np.uint8).tobytes())
        return h.hexdigest()


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    """Batches small enough that packing stops soon after it has enough tokens."""
    batch: list[Document] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def pack(documents: Iterable[Document], tokenizer, seq_len: int, n_seqs: int,
         start_id: int | None, sep_id: int | None) -> Packed:
    """Tokenize documents into one stream (sep_id after each document) and cut it into n_seqs
    sequences of seq_len tokens: start_id, if any, then the next stream tokens. A tail too short
    for a full sequence is dropped. Fewer sequences than asked set `short`; none raise UserError."""
    body = seq_len - (start_id is not None)
    if body < 1:
        raise UserError(f"--seq-len must be at least {2 if start_id is not None else 1}")
    if n_seqs < 1:
        raise ValueError(f"n_seqs must be positive, got {n_seqs}")
    need = body * n_seqs
    pieces: list[np.ndarray] = []  # token ids of each document, separator included
    doc_domains: list[int] = []
    domain_ids: dict[str, int] = {}  # in order of first appearance
    have = 0
    for batch in _batches(documents):
        # verbose=False: the "longer than the maximum length" warning does not apply, we cut later.
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)
        for doc, ids in zip(batch, encoded["input_ids"]):
            if sep_id is not None:
                ids = [*ids, sep_id]
            if not ids:
                continue
            pieces.append(np.asarray(ids, dtype=np.int32))
            doc_domains.append(domain_ids.setdefault(doc.domain, len(domain_ids)))
            have += len(ids)
        if have >= need:
            break

    n = min(n_seqs, have // body)
    if n == 0:
        raise UserError(f"the data holds only {have} tokens, fewer than one sequence of {seq_len}; "
                        "lower --seq-len or give more data")
    used = n * body
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    tokens = np.concatenate(pieces)[:used].reshape(n, body)
    domains = np.repeat(np.array(doc_domains, dtype=np.int32), lengths)[:used].reshape(n, body)
    if start_id is not None:
        tokens = np.concatenate([np.full((n, 1), start_id, dtype=np.int32), tokens], axis=1)
        domains = np.concatenate([domains[:, :1], domains], axis=1)

    # Number the domains present in name order, so the ids do not depend on the document order.
    names = list(domain_ids)
    present = sorted(names[i] for i in np.unique(domains))
    if len(present) > 256:
        raise UserError(f"the data has {len(present)} domains, more than 256; use fewer 'domain' values")
    remap = np.zeros(len(names), dtype=np.uint8)
    for new, name in enumerate(present):
        remap[domain_ids[name]] = new
    starts = np.cumsum(lengths) - lengths
    return Packed(tokens=tokens, domains=remap[domains], domain_names=present,
                  n_documents=int(np.count_nonzero(starts < used)), short=n < n_seqs)
