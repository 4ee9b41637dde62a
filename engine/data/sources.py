"""Data sources: what each spec opens, and the documents of all of them in one seeded shuffled order
(the readers of each format are in `engine.data.formats`).

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

import os
import platform
import random
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from ffnscope.cache.errors import UserError
from ffnscope.engine.data.formats import (ArrowDataset, JsonLines, Streamed, TextFiles, format_stem, is_dataset_dir,
                                          is_jsonl, looks_binary, open_streamed, streamed_kind)

_KINDS_HINT = ("give a text file, a directory, a .jsonl (.jsonl.gz, .jsonl.zst) or .parquet file, "
               "a saved Hugging Face dataset directory, or 'builtin'")
_WINDOW_FIRST = 1 << 10  # documents of the shuffled order fetched in the first pass over streamed sources
_WINDOW_MAX = 1 << 16


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    source: str


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
        self._sources: list[TextFiles | JsonLines | Streamed] = []
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
        elif path.is_dir() and is_dataset_dir(path):
            source = ArrowDataset(spec, self.notes, path, field, path.resolve().name or "data")
            self._sources.append(source)
            self._described.append({"kind": "hf-dataset", "path": str(path.resolve()), "size": source.size,
                                    "documents": source.count, "fingerprint": source.fingerprint})
        elif path.is_dir():
            self._open_directory(spec, path, field)
        elif path.is_file() and (kind := streamed_kind(path)):
            source = open_streamed(spec, self.notes, path, field, format_stem(path), kind)
            self._sources.append(source)
            self._described.append({"kind": kind, "path": str(path.resolve()), "size": path.stat().st_size,
                                    "documents": source.count})
        elif path.is_file():
            if looks_binary(path):
                raise UserError(
                    f"{spec} looks binary (NUL bytes); give text, JSONL or a directory of text files"
                )
            if is_jsonl(path):
                source: TextFiles | JsonLines | Streamed = JsonLines(spec, self.notes, path, field, path.stem)
            else:
                source = TextFiles(spec, self.notes, [path], [path.stem])
            self._sources.append(source)
            self._described.append({"kind": "jsonl" if is_jsonl(path) else "text",
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
                below = path.relative_to(root).parts
                domain = below[0] if len(below) > 1 else own_name
                if kind := streamed_kind(path):
                    size += path.stat().st_size
                    opened.append(open_streamed(str(path), self.notes, path, field, domain, kind))
                    continue
                if looks_binary(path):
                    binary += 1
                    continue
                size += path.stat().st_size
                if is_jsonl(path):
                    opened.append(JsonLines(str(path), self.notes, path, field, domain))
                else:
                    texts.append(path)
                    domains.append(domain)
        opened.append(TextFiles(spec, self.notes, texts, domains))
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
        if not any(isinstance(s, Streamed) for s in self._sources):
            for index in order:
                i = bisect_right(ends, index)
                yield Document(*self._sources[i].load(index - (ends[i - 1] if i else 0)))
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
                if isinstance(self._sources[i], Streamed):
                    wanted.setdefault(i, set()).add(k)
            fetched = {i: self._sources[i].fetch(ks) for i, ks in wanted.items()}
            for i, k in located:
                yield Document(*(fetched[i][k] if i in fetched else self._sources[i].load(k)))


def open_sources(specs: list[str], field: str = "text", seed: int = 0) -> Sources:
    """Open data sources (see the module docstring); bad input raises a one-line UserError."""
    return Sources(specs, field, seed)


