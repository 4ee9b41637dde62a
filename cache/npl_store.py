"""The NPL sidecar: `<cache>.npl.h5` beside a recording cache, holding Neuron Predictability Lens
maps, their held-out metrics and the results computed with them (numpy and h5py only).

Layout (format "ffnscope-npl", schema v1):

    attrs: format, schema_version, meta (JSON: "cache" tie, "model", "fit" parameters and timings)
    data/fit_hashes        (n_fit,) uint64, sorted: fingerprints of the fit sequences
    data/heldout_hashes    (n_heldout,) uint64: the fit run's held-out sequences (none recorded or fit on)
    data/heldout_tokens    (n_heldout, seq_len) int32: those sequences, reused as default held-out text
    data/heldout_nll       (n_heldout, seq_len - 1) float32: the unmodified model's per-token loss
    maps/<method>/<i>_<j>/ W (d_ffn, d_ffn) float32 and b (d_ffn,) float64: g_j ~ g_i @ W + b
                           pearson, l2, target_mean, target_var (d_ffn,) float64: held-out metrics
                           attrs: source, target, n_heldout, token_l2, mse, fvu, mean_pearson
    results/<name>/        attrs params (JSON), rows (JSON list of dicts); datasets of the result

A sequence fingerprint is the first 8 bytes of sha256 over the sequence's token ids (int32 little
endian), read as a big-endian uint64. Held-out text that shares a fingerprint with the recording's
or the fit's sequences is refused (engine.npl.inputs).

The sidecar is tied to its cache by the cache's model fingerprint, data fingerprint and creation
time (meta["cache"]); a sidecar whose cache was recorded again is refused as stale. It is only
ever replaced whole (cache.atomic: temporary file, fsync, rename), so a killed job never leaves a torn file;
a fit writes it in steps (NplWriter: each group of pairs' maps as the group is solved, into the temporary).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import check_fingerprint
from ffnscope.cache.store import put_array as _put
from ffnscope.cache.store import nbytes, replaced

FORMAT = "ffnscope-npl"
SCHEMA_VERSION = 1
SUFFIX = ".npl.h5"
METRIC_NAMES = ("pearson", "l2", "target_mean", "target_var")
SCALAR_METRICS = ("n_heldout", "token_l2", "mse", "fvu", "mean_pearson")


def sidecar_path(cache: Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + SUFFIX)


def sequence_hashes(tokens: np.ndarray) -> np.ndarray:
    """(n, seq_len) token ids -> (n,) uint64 fingerprints (see the module docstring)."""
    rows = np.ascontiguousarray(np.asarray(tokens), dtype="<i4")
    out = np.empty(len(rows), np.uint64)
    for k, row in enumerate(rows):
        out[k] = int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "big")
    return out


def cache_tie(cache_meta: dict) -> dict:
    """What ties a sidecar to one recording."""
    return {"model_fingerprint": cache_meta["model"]["fingerprint"],
            "data_fingerprint": cache_meta["data"]["fingerprint"],
            "created": cache_meta.get("created")}


def pair_key(i: int, j: int) -> str:
    return f"{i:03d}_{j:03d}"


@dataclass
class MapRecord:
    """One fitted map M_{source->target} with its held-out metrics."""
    source: int
    target: int
    W: np.ndarray                     # (d_ffn, d_ffn): prediction = g_source @ W + b
    b: np.ndarray                     # (d_ffn,)
    metrics: dict[str, np.ndarray]    # METRIC_NAMES -> (d_ffn,)
    scalars: dict[str, float]         # SCALAR_METRICS -> value


@dataclass
class NplFile:
    meta: dict
    fit_hashes: np.ndarray
    heldout_hashes: np.ndarray
    heldout_tokens: np.ndarray
    heldout_nll: np.ndarray
    maps: dict[str, dict[tuple[int, int], MapRecord]] = field(default_factory=dict)


def map_bytes(n_maps: int, d: int) -> int:
    """Bytes `n_maps` maps of width d take in a sidecar, uncompressed (W float32, b and the metrics float64)."""
    return n_maps * (4 * d * d + 8 * d * (1 + len(METRIC_NAMES)) + 6 * 4096)


class _Abandoned(Exception):
    """Thrown into the writer to drop its temporary without a storage error (the fit failed, not the disk)."""


class NplWriter:
    """A sidecar written in steps through the store's one writer (cache.store.replaced): `put` each map as
    its group of pairs is solved (it leaves memory then), `finish` with the data and meta. Everything goes
    into the writer's temporary; only finish renames it over `path`, so a kill or a failure at any point
    leaves the old sidecar (or none), never a torn or half-updated one. A context manager: leaving the
    block unfinished drops the temporary."""

    def __init__(self, path: Path, needs: int = 0):
        self.path = Path(path)
        self._replacing = replaced(self.path, failure=f"could not write {self.path}", needs=needs)
        self._file = self._replacing.__enter__()
        self._open = True

    def _write(self, step) -> None:
        try:
            step(self._file)
        except (OSError, RuntimeError) as exc:  # the disk's failure: the writer's one line, temporary gone
            self._open = False
            self._replacing.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def put(self, method: str, rec: MapRecord) -> None:
        """One map and its metrics (W stored as float32)."""
        def step(f):
            group = f.create_group(f"maps/{method}/{pair_key(rec.source, rec.target)}")
            group.attrs["source"], group.attrs["target"] = int(rec.source), int(rec.target)
            for name, value in rec.scalars.items():
                group.attrs[name] = float(value)
            _put(group, "W", np.asarray(rec.W, dtype=np.float32), compress=False)  # in blocks: d_ffn^2 floats
            _put(group, "b", np.asarray(rec.b, np.float64), compress=False)
            for name in METRIC_NAMES:
                _put(group, name, np.asarray(rec.metrics[name], np.float64), compress=False)
            f.flush()  # the group's maps on disk now, not in HDF5's buffers
        self._write(step)

    def finish(self, meta: dict, fit_hashes: np.ndarray, heldout_hashes: np.ndarray, heldout_tokens: np.ndarray,
               heldout_nll: np.ndarray) -> None:
        """The data and meta; then the sidecar replaces `path` whole."""
        def step(f):
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["meta"] = json.dumps(meta)
            data = f.create_group("data")
            _put(data, "fit_hashes", np.sort(fit_hashes.astype(np.uint64)))
            _put(data, "heldout_hashes", heldout_hashes.astype(np.uint64))
            _put(data, "heldout_tokens", heldout_tokens.astype(np.int32))
            _put(data, "heldout_nll", heldout_nll.astype(np.float32))
            f.create_group("results")
        self._write(step)
        self._open = False
        self._replacing.__exit__(None, None, None)  # flush, fsync, rename (a failure: one line)

    @property
    def maps(self) -> "StoredMaps":
        """The maps, read from the sidecar once finish has written it."""
        return StoredMaps(self.path)

    def abandon(self) -> None:
        if self._open:
            self._open = False
            self._replacing.__exit__(_Abandoned, _Abandoned(), None)

    def __enter__(self) -> "NplWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abandon()


def write_npl(path: Path, npl: NplFile) -> None:
    """Write a whole sidecar atomically (maps stored as float32; results from an older sidecar are
    not carried over: they belong to the maps they were computed with)."""
    with NplWriter(path, needs=nbytes(npl)) as writer:
        for method, records in npl.maps.items():
            for _pair, rec in sorted(records.items()):
                writer.put(method, rec)
        writer.finish(npl.meta, npl.fit_hashes, npl.heldout_hashes, npl.heldout_tokens, npl.heldout_nll)


def write_result(path: Path, name: str, params: dict, rows: list[dict] | None = None,
                 arrays: dict[str, np.ndarray] | None = None) -> None:
    """Store (or replace) results/<name> copy-on-write: the maps are never at risk."""
    with replaced(path, ".result", copy=True, failure=f"could not write results into {path}",
                  needs=nbytes([rows or [], arrays or {}])) as f:
        if f.attrs.get("format") != FORMAT:
            raise UserError(f"{path} changed while results were computed; run the job again")
        key = f"results/{name}"
        if key in f:
            del f[key]
        group = f.create_group(key)
        group.attrs["params"] = json.dumps(params)
        group.attrs["rows"] = json.dumps(rows or [])
        for key, array in (arrays or {}).items():
            _put(group, key, np.asarray(array))


class NplReader:
    """Lazy reader of a sidecar: meta at once, maps and metrics when asked."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"no NPL maps: {self.path} does not exist; fit them first with "
                            f"`ffnscope npl fit {_cache_name(self.path)}`")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError:
            raise UserError(f"{self.path} is not a readable HDF5 file; fit the maps again with "
                            f"`ffnscope npl fit {_cache_name(self.path)} --force`") from None
        if self._file.attrs.get("format") != FORMAT:
            self._file.close()
            raise UserError(f"{self.path} is not an ffnscope NPL sidecar; move it away and fit the maps again")
        version = int(self._file.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            self._file.close()
            raise UserError(f"{self.path} uses NPL schema v{version}, this ffnscope reads v{SCHEMA_VERSION}; "
                            "fit the maps again with --force")
        self.meta = json.loads(self._file.attrs["meta"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "NplReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- ties ------------------------------------------------------------------------------------
    def check_cache(self, cache_meta: dict, cache_path: Path | str = "the cache") -> None:
        """Refuse a sidecar that belongs to another recording."""
        mine, theirs = self.meta["cache"], cache_tie(cache_meta)
        if mine != theirs:
            what = "model" if mine["model_fingerprint"] != theirs["model_fingerprint"] else "recording"
            raise UserError(f"{self.path} was fit for another {what} than {cache_path} now holds; fit the maps "
                            f"again with `ffnscope npl fit {cache_path} --force`")

    def check_model(self, fingerprint: str, name: str = "the loaded model") -> None:
        """Refuse applying maps to a model they were not fit on."""
        expected = self.meta["model"]["fingerprint"]
        check_fingerprint(expected, fingerprint, f"the NPL sidecar {self.path}",
                          f"the NPL maps in {self.path} were fit on model {self.meta['model']['name']} "
                          f"(fingerprint {expected}), not on {name} (fingerprint {fingerprint}); use the "
                          "recording's model, or fit maps for this model on its own cache")

    # --- data --------------------------------------------------------------------------------------
    def fit_hashes(self) -> np.ndarray:
        return self._file["data/fit_hashes"][:]

    def heldout_hashes(self) -> np.ndarray:
        return self._file["data/heldout_hashes"][:]

    def heldout_tokens(self) -> np.ndarray:
        return self._file["data/heldout_tokens"][:]

    def heldout_nll(self) -> np.ndarray:
        return self._file["data/heldout_nll"][:]

    # --- maps ---------------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        return sorted(self._file["maps"]) if "maps" in self._file else []

    def pairs(self, method: str = "exact") -> list[tuple[int, int]]:
        group = self._file.get(f"maps/{method}")
        if group is None:
            return []
        return sorted((int(g.attrs["source"]), int(g.attrs["target"])) for g in group.values())

    def has(self, i: int, j: int, method: str = "exact") -> bool:
        return f"maps/{method}/{pair_key(i, j)}" in self._file

    def _group(self, i: int, j: int, method: str) -> h5py.Group:
        key = f"maps/{method}/{pair_key(i, j)}"
        if key not in self._file:
            raise UserError(f"{self.path} has no {method} map from layer {i} to layer {j}; fit it with "
                            f"`ffnscope npl fit {_cache_name(self.path)} --pairs {i}:{j} --force`")
        return self._file[key]

    def load_map(self, i: int, j: int, method: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        group = self._group(i, j, method)
        return group["W"][:], group["b"][:]

    def metrics(self, i: int, j: int, method: str = "exact") -> dict[str, np.ndarray]:
        group = self._group(i, j, method)
        return {name: group[name][:] for name in METRIC_NAMES}

    def scalars(self, i: int, j: int, method: str = "exact") -> dict[str, float]:
        group = self._group(i, j, method)
        return {name: float(group.attrs[name]) for name in SCALAR_METRICS if name in group.attrs}

    def record(self, i: int, j: int, method: str = "exact") -> MapRecord:
        W, b = self.load_map(i, j, method)
        return MapRecord(i, j, W, b, self.metrics(i, j, method), self.scalars(i, j, method))

    # --- results ------------------------------------------------------------------------------------
    def results(self) -> list[str]:
        return sorted(self._file["results"]) if "results" in self._file else []

    def result(self, name: str) -> dict | None:
        """-> {"params": dict, "rows": list[dict], "arrays": {name: array}} or None."""
        group = self._file.get(f"results/{name}")
        if group is None:
            return None
        arrays: dict[str, np.ndarray] = {}
        group.visititems(lambda k, obj: arrays.__setitem__(k, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return {"params": json.loads(group.attrs["params"]), "rows": json.loads(group.attrs["rows"]),
                "arrays": arrays}


class StoredMaps(Mapping):
    """method -> pair -> MapRecord, read from a sidecar when asked: one map in memory at a time."""

    def __init__(self, path: Path, method: str | None = None):
        self.path, self.method = Path(path), method

    def _keys(self) -> list:
        with NplReader(self.path) as reader:
            return reader.methods() if self.method is None else reader.pairs(self.method)

    def __getitem__(self, key):
        if self.method is None:
            if key not in self._keys():
                raise KeyError(key)
            return StoredMaps(self.path, key)
        with NplReader(self.path) as reader:
            if not reader.has(*key, self.method):
                raise KeyError(key)
            return reader.record(*key, self.method)

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


def _cache_name(sidecar: Path) -> str:
    name = Path(sidecar).name
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def pair_summary(reader: NplReader, method: str = "exact", key: str = "token_l2") -> dict[str, float | None]:
    """The paper's averages over fitted pairs: shallow-to-deep (i<j), deep-to-shallow (i>j), self."""
    groups: dict[str, list[float]] = {"shallow_to_deep": [], "deep_to_shallow": [], "self": []}
    for i, j in reader.pairs(method):
        value = reader.scalars(i, j, method).get(key)
        if value is None or not np.isfinite(value):
            continue
        groups["shallow_to_deep" if i < j else "deep_to_shallow" if i > j else "self"].append(value)
    return {name: (float(np.mean(v)) if v else None) for name, v in groups.items()}
