"""Write and read recording caches (HDF5, schema v1).

A cache is only ever replaced whole: the new image goes to a temporary file beside it, is
flushed to disk, and is renamed over the old one. A kill at any moment leaves either the previous
checkpoint or the new one, never a torn file, and only the final write says `complete`.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from cache import schema
from cache.errors import UserError
from cache.state import DataState, GramCounts, LayerState, RecordingState, Samples, Sparse

_GZIP = dict(compression="gzip", compression_opts=1, shuffle=True)


def put_array(group: h5py.Group, name: str, array: np.ndarray, compress: bool = True) -> None:
    """A dataset with the store's options: gzip level 1 with shuffle, for arrays worth compressing."""
    array = np.ascontiguousarray(array)
    options = _GZIP if compress and array.size >= 4096 else {}
    group.create_dataset(name, data=array, **options)


@contextmanager
def replaced(path: Path, tag: str = "", copy: bool = False, failure: str | None = None):
    """An open HDF5 file that replaces `path` whole when the block ends: a temporary file beside it
    (a copy of `path` when copy=True), flushed to disk, renamed over it. Nothing else ever writes a
    file of ours, so a kill at any moment leaves the old file or the new one, never a torn one.
    `failure`: a one-line UserError for an OSError (with its reason appended); None lets it through."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{tag}.tmp")
    try:
        if copy:
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a" if copy else "w") as f:
            yield f
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        os.replace(tmp, path)
    except OSError as exc:
        if failure is None:
            raise
        raise UserError(f"{failure} ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_state(path: Path, state: RecordingState, status: str) -> None:
    with replaced(path) as f:
        f.attrs["format"] = schema.FORMAT
        f.attrs["schema_version"] = schema.SCHEMA_VERSION
        f.attrs["status"] = status
        f.attrs["shards_done"] = state.shards_done
        f.attrs["meta"] = json.dumps(state.meta)
        data = f.create_group("data")
        put_array(data, "tokens", state.data.tokens)
        put_array(data, "seq_index", state.data.seq_index)
        put_array(data, "domains", state.data.domains)
        put_array(data, "unigram", state.data.unigram)
        for n, grams in state.data.grams.items():
            put_array(data, f"gram{n}/gram", grams.gram)
            put_array(data, f"gram{n}/count", grams.count)
        for index, layer in state.layers.items():
            group = f.create_group(schema.layer_group(index))
            for name in schema.LAYER_ARRAYS:
                value = getattr(layer, name)
                put_array(group, name, value)
            if layer.ngram_counted is not None:
                put_array(group, "ngram_counted", layer.ngram_counted)
                for n, sparse in layer.ngrams.items():
                    for column in ("gram", "neuron", "count"):
                        put_array(group, f"ngram{n}/{column}", getattr(sparse, column))
        _put_strings(f, "tokenizer/vocab", state.vocab)
        _put_strings(f, "tokenizer/pieces", state.pieces)
        samples = f.create_group("samples")
        put_array(samples, "index", state.samples.index)
        acts = state.samples.acts
        chunks = (1, max(1, min(acts.shape[1], 256)), acts.shape[2]) if acts.size else None
        samples.create_dataset("acts", data=acts, chunks=chunks)


def open_file(path: Path, purpose: str) -> h5py.File:
    """Open a cache for reading with a one-line error for everything that is not one of ours."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"cache not found: {path}; record one with `ffnscope record`")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a recording cache file (.h5)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not a readable HDF5 file (truncated or foreign); "
                        f"record it again or restore a good copy before {purpose}") from None
    if f.attrs.get("format") != schema.FORMAT:
        f.close()
        raise UserError(f"{path} is an HDF5 file but not an ffnscope recording; give a cache written "
                        "by `ffnscope record`")
    version = int(f.attrs.get("schema_version", -1))
    if version != schema.SCHEMA_VERSION:
        f.close()
        raise UserError(f"{path} uses cache schema v{version}, this ffnscope reads v{schema.SCHEMA_VERSION}; "
                        "upgrade ffnscope or record again")
    return f


def _put_strings(f: h5py.File, name: str, strings: list[str]) -> None:
    """Strings as one UTF-8 blob plus offsets: exact for any text, NUL and control characters
    included (HDF5's variable-length strings stop at NUL)."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    put_array(f, f"{name}/bytes", np.frombuffer(b"".join(encoded), np.uint8))
    put_array(f, f"{name}/offsets", offsets)


def read_strings(f: h5py.File, name: str) -> list[str]:
    blob = f[f"{name}/bytes"][:].tobytes()
    offsets = f[f"{name}/offsets"][:]
    return [blob[a:b].decode("utf-8", "replace") for a, b in zip(offsets[:-1], offsets[1:])]


def _sparse(group: h5py.Group) -> Sparse:
    return Sparse(group["gram"][:], group["neuron"][:], group["count"][:].astype(np.int64))


def read_state(path: Path, purpose: str) -> RecordingState:
    """Load a whole cache into memory (for resume and merge)."""
    with open_file(path, purpose) as f:
        try:
            meta = json.loads(f.attrs["meta"])
            data = f["data"]
            grams = {int(name[4:]): GramCounts(data[name]["gram"][:], data[name]["count"][:])
                     for name in data if name.startswith("gram")}
            data_state = DataState(data["tokens"][:], data["seq_index"][:], data["domains"][:],
                                   data["unigram"][:], grams)
            layers = {}
            for name, group in f["layers"].items():
                arrays = {k: group[k][:] for k in schema.LAYER_ARRAYS}
                counted = group["ngram_counted"][:] if "ngram_counted" in group else None
                ngrams = {int(k[5:]): _sparse(group[k]) for k in group if k.startswith("ngram") and k != "ngram_counted"}
                layers[int(name)] = LayerState(**arrays, ngram_counted=counted, ngrams=ngrams)
            samples = Samples(f["samples/index"][:], f["samples/acts"][:])
            return RecordingState(meta, dict(sorted(layers.items())), data_state, samples,
                                  int(f.attrs["shards_done"]), str(f.attrs["status"]),
                                  read_strings(f, "tokenizer/vocab"), read_strings(f, "tokenizer/pieces"))
        except (KeyError, ValueError, OSError) as exc:
            raise UserError(f"{path} is damaged ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
                            "record it again") from None
