"""The recordings catalog: one summary row per cache file, from its metadata only (no big arrays,
no torch), for the TUI's list of recordings. A file that cannot be read is a row with status
"error" and the one-line reason, never an exception."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ffnscope.cache import analysis_store
from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.cache.npl_store import SUFFIX as NPL_SUFFIX
from ffnscope.cache.provenance import weights_note
from ffnscope.cache.schema import ANALYSES, COMPLETE, PARTIAL
from ffnscope.engine.jobs.progress import one_line
from ffnscope.engine.paths import recordings_dir, unique_paths

ERROR = "error"  # a row whose file cannot be read: the catalog's own status beside the cache's two


@dataclass
class RecordingSummary:
    path: Path
    name: str                        # the file name
    model: str | None = None         # short model name, like "SmolLM2-135M-Instruct" or "opt-125m"
    weights: str = ""                # a dequantized GGUF's quantization, like "Q4_1 GGUF" (provenance.weights_note)
    n_tokens: int | None = None      # tokens recorded so far (all of them when complete)
    created: str | None = None       # when the recording began, ISO 8601 UTC, from its metadata
    status: str = ERROR              # "complete", "partial" or "error"
    analyzed: bool = False           # every analysis stored, for the recording as it is now
    n_layers: int | None = None      # layers recorded
    d_ffn: int | None = None
    seq_len: int | None = None
    tau: float | None = None         # the primary firing threshold
    error: str | None = None         # one line, for status "error"
    size_bytes: int | None = None
    analyses: dict[str, str] = field(default_factory=dict)  # name -> "current", "stale" or "missing"
    model_layers: int | None = None  # layers of the model
    family: str | None = None
    firing_rule: str | None = None
    tokens_total: int | None = None  # tokens the recording (its part) will hold when complete
    shards_done: int | None = None
    n_shards: int | None = None
    tokens_per_s: object = None      # the recording job's measured speed, as its metadata holds it (estimate)

    @property
    def ok(self) -> bool:
        return self.status != ERROR


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


# path -> (what its stat said, its summary): the TUI lists recordings every second, and a cache only
# changes by being replaced whole (a new inode and mtime), so an unchanged stat needs no reopening
_seen: dict[Path, tuple[tuple, RecordingSummary]] = {}


def summarize(path: Path, opened: tuple[CacheReader, int] | None = None) -> RecordingSummary:
    """The summary of one cache file; errors become a row with status "error". `opened`: a reader the
    caller holds open on this file and the file's mtime_ns when it opened it: read from it rather than
    opening and checking the file again, if the file is still that one."""
    path = Path(path)
    try:
        st = path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    known = _seen.get(path)
    if stamp is not None and known is not None and known[0] == stamp:
        return replace(known[1])
    reader = opened[0] if opened is not None and stamp is not None and stamp[1] == opened[1] else None
    row = _summarize(path, None if stamp is None else stamp[2], reader)
    if stamp is not None:
        _seen[path] = (stamp, replace(row))
    return row


def _summarize(path: Path, size: int | None, reader: CacheReader | None = None) -> RecordingSummary:
    row = RecordingSummary(path=path, name=path.name, size_bytes=size)
    try:
        if reader is not None:
            _fill(row, reader)
            return row
        with CacheReader(path, "listing it") as reader:
            _fill(row, reader)
    except UserError as exc:
        row.status, row.error = ERROR, one_line(str(exc))
    except Exception as exc:  # a cache of ours with broken metadata: still a row, never a crash
        row.status, row.error = ERROR, one_line(f"{path} is damaged or unreadable ({exc.__class__.__name__}: {exc})")
    return row


def _fill(row: RecordingSummary, reader: CacheReader) -> None:
    meta = reader.meta
    model, data, rec = meta.get("model", {}), meta.get("data", {}), meta.get("recording", {})
    row.model = _short(str(model.get("name") or model.get("spec") or "")) or None
    row.weights = weights_note(model.get("weights_from"), short=True)
    row.family = model.get("family")
    row.model_layers = model.get("n_layers")
    row.d_ffn = model.get("d_ffn")
    row.seq_len = data.get("seq_len")
    row.created = meta.get("created")
    row.tau = rec.get("primary_tau")
    row.firing_rule = rec.get("firing_rule")
    row.n_layers = len(rec["layers"]) if rec.get("layers") is not None else len(reader.layers)
    row.tokens_total = rec.get("part_tokens")
    row.tokens_per_s = rec.get("tokens_per_s")
    row.n_shards = rec.get("n_shards")
    row.shards_done = reader.shards_done
    row.n_tokens = reader.n_tokens
    status = reader.status
    if status not in (COMPLETE, PARTIAL):
        raise UserError(f"{reader.path} has an unknown status '{status}'")
    row.status = status
    key = analysis_store.recording_key(reader) if status == COMPLETE else None
    for name in ANALYSES:
        info = analysis_store.stored(reader, name)
        row.analyses[name] = "missing" if info is None else (
            "current" if key is not None and info.get("recording") == key else "stale")
    row.analyzed = all(state == "current" for state in row.analyses.values())


def _caches_in(directory: Path) -> list[Path]:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    # temporary images (".c.h5.123.tmp", ".c.h5.123.analysis.tmp") do not end in .h5; hidden files and
    # NPL sidecars (their recording's row stands for them) are skipped
    return sorted(Path(e.path) for e in entries
                  if e.name.endswith(".h5") and not e.name.endswith(NPL_SUFFIX) and not e.name.startswith(".")
                  and e.is_file())


def scan(files: Iterable[Path] = (), dirs: Iterable[Path] | None = None,
         opened: dict[Path, tuple[CacheReader, int]] | None = None) -> list[RecordingSummary]:
    """A summary of every *.h5 in `dirs` (default: the recordings directory; not recursive) and of
    each of `files` (given files are listed even when they are missing or not caches), each once.
    `opened`: absolute path -> summarize's `opened`, for files the caller holds open."""
    dirs = [recordings_dir()] if dirs is None else [Path(d) for d in dirs]
    paths: list[Path] = []
    for directory in dirs:
        paths += _caches_in(directory)
    paths += [Path(f) for f in files]
    opened = opened or {}
    return [summarize(path, opened.get(path.absolute())) for path in unique_paths(paths)]
