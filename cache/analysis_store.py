"""Derived tables stored in the cache under `analysis/<name>`, each with the parameters and the
recording state that produced it, so `analyze` recomputes only what is missing or stale.

Writes are copy-on-write: the cache is copied beside itself, the copy gets the new groups and is
renamed over the original. A recording may have cost hours of GPU time; an analysis killed in the
middle of an in-place HDF5 write could leave it unreadable.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.provenance import Provenance
from ffnscope.cache.reader import CacheReader
from ffnscope.cache.store import nbytes, replaced

ROOT = "analysis"
# every stored analysis, in dependency order (engine.analysis.job runs them; explore and the CLI list them)


def recording_key(reader: CacheReader) -> str:
    """What an analysis result depends on in the recording itself."""
    return _key(reader.provenance, reader.n_tokens, reader.status)


def _key_of(f: h5py.File) -> str:
    """recording_key of an open cache file (the copy an analysis is written into)."""
    return _key(Provenance.from_meta(json.loads(f.attrs["meta"])), int(np.prod(f["data/tokens"].shape)),
                str(f.attrs["status"]))


def _key(prov: Provenance, n_tokens: int, status: str) -> str:
    basis = [prov.data.fingerprint, prov.model.fingerprint, prov.created, prov.recording.parts, n_tokens, status]
    return hashlib.sha256(json.dumps(basis, default=str).encode()).hexdigest()[:16]


def stored(reader: CacheReader, name: str) -> dict | None:
    """-> {"params": ..., "recording": ..., "inputs": ...} of a stored analysis, or None."""
    attrs = reader.attrs(f"{ROOT}/{name}")
    if attrs is None:
        return None
    return {key: json.loads(attrs[key]) for key in ("params", "recording", "inputs") if key in attrs}


def is_current(reader: CacheReader, name: str, params: dict, inputs: dict | None = None) -> bool:
    if reader.analysis_damage(name):  # damaged (cache.validate): computed again
        return False
    info = stored(reader, name)
    return (info is not None and info.get("params") == params and info.get("recording") == recording_key(reader)
            and info.get("inputs", {}) == (inputs or {}))


def require(reader: CacheReader, names=schema.ANALYSES) -> None:
    """UserError unless every named analysis is stored and was computed on the recording the file
    holds now: a result of another recording (recorded again, or resumed, since) describes other data."""
    missing = [n for n in names if stored(reader, n) is None]
    if missing:
        raise UserError(f"{reader.path} has no {', '.join(missing)} analysis yet; run `ffnscope analyze "
                        f"{reader.path}` first")
    key = recording_key(reader)
    for name in names:
        if stored(reader, name).get("recording") != key:
            raise UserError(f"the {name} analysis in {reader.path} was computed on another recording than the "
                            f"one the file now holds; run `ffnscope analyze {reader.path}` to bring it up to date")


def read_group(reader: CacheReader, name: str) -> dict[str, np.ndarray]:
    """Every dataset of an analysis group, keyed by its path inside the group; UserError for one that is
    missing or stale (require)."""
    require(reader, (name,))
    return reader.datasets(f"{ROOT}/{name}")


def read_unchecked(reader: CacheReader, name: str, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Some datasets of a stored analysis without read_group's staleness check, None when there is no
    such analysis: for what describes the data rather than the results (positional's "too few
    sequences per position" verdict)."""
    if reader.attrs(f"{ROOT}/{name}") is None:
        return None
    return reader.datasets(f"{ROOT}/{name}", keys)


class Result:
    """One analysis' output: datasets plus the attributes that say how it was made."""

    def __init__(self, name: str, params: dict, inputs: dict | None = None):
        self.name = name
        self.params = params
        self.inputs = inputs or {}
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, key: str, array) -> None:
        self.arrays[key] = np.asarray(array)


def put_result(f: h5py.File, result: Result, recording: str) -> None:
    """One analysis group, with the attributes that say how it was made, into an open file."""
    group = f.create_group(f"{ROOT}/{result.name}")
    group.attrs["params"] = json.dumps(result.params)
    group.attrs["recording"] = json.dumps(recording)
    group.attrs["inputs"] = json.dumps(result.inputs)
    for name, array in result.arrays.items():
        options = dict(compression="gzip", compression_opts=1) if array.size >= 4096 else {}
        group.create_dataset(name, data=array, **options)


def write_results(path: Path, results: list[Result], recording: str) -> None:
    if not results:
        return
    # a copy of the cache plus the results: refused before HDF5 starts when the disk has no room for it
    with replaced(path, ".analysis", copy=True, failure=f"could not write analyses into {path}",
                  needs=sum(nbytes(r) for r in results)) as f:
        if f.attrs.get("format") != schema.FORMAT or _key_of(f) != recording:
            raise UserError(f"{path} changed while being analysed (another recording is in it now); "
                            "nothing was written; run analyze again")
        for result in results:
            key = f"{ROOT}/{result.name}"
            try:
                if key in f:
                    del f[key]
            except (KeyError, OSError, RuntimeError):  # a damaged header: HDF5 cannot unlink the group
                raise UserError(f"{path}: its stored {result.name} analysis is damaged and cannot be replaced; "
                                "nothing was written; record the cache again") from None
            put_result(f, result, recording)
