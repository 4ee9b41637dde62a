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
from ffnscope.cache.reader import CacheReader
from ffnscope.cache.store import nbytes, replaced

ROOT = "analysis"


def recording_key(reader: CacheReader) -> str:
    """What an analysis result depends on in the recording itself."""
    return _key(reader.meta, reader.n_tokens, reader.status)


def _key_of(f: h5py.File) -> str:
    """recording_key of an open cache file (the copy an analysis is written into)."""
    return _key(json.loads(f.attrs["meta"]), int(np.prod(f["data/tokens"].shape)), str(f.attrs["status"]))


def _key(meta: dict, n_tokens: int, status: str) -> str:
    basis = [meta["data"]["fingerprint"], meta["model"]["fingerprint"], meta["created"],
             meta["recording"].get("parts"), n_tokens, status]
    return hashlib.sha256(json.dumps(basis, default=str).encode()).hexdigest()[:16]


def stored(reader: CacheReader, name: str) -> dict | None:
    """-> {"params": ..., "recording": ..., "inputs": ...} of a stored analysis, or None."""
    group = reader.file.get(f"{ROOT}/{name}")
    if group is None:
        return None
    return {key: json.loads(group.attrs[key]) for key in ("params", "recording", "inputs") if key in group.attrs}


def is_current(reader: CacheReader, name: str, params: dict, inputs: dict | None = None) -> bool:
    info = stored(reader, name)
    return (info is not None and info.get("params") == params and info.get("recording") == recording_key(reader)
            and info.get("inputs", {}) == (inputs or {}))


def read_group(reader: CacheReader, name: str) -> dict[str, np.ndarray]:
    """Every dataset of an analysis group, keyed by its path inside the group. Refuses a result computed
    on another recording than the one in the file (recorded again, or resumed, since): its numbers
    would describe other data."""
    group = reader.file[f"{ROOT}/{name}"]
    made_on = json.loads(group.attrs["recording"]) if "recording" in group.attrs else None
    if made_on != recording_key(reader):
        raise UserError(f"the {name} analysis in {reader.path} was computed on another recording than the one "
                        f"the file now holds; run `ffnscope analyze {reader.path}` to bring it up to date")
    out: dict[str, np.ndarray] = {}
    group.visititems(lambda key, obj: out.__setitem__(key, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


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
            if key in f:
                del f[key]
            put_result(f, result, recording)
