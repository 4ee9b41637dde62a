"""Write and read recording caches (HDF5; cache.schema holds the version and names).

A cache is only ever replaced whole (cache.atomic): the new image goes to a temporary file beside
it, is flushed to disk, and is renamed over the old one. A kill at any moment leaves either the previous
checkpoint or the new one, never a torn file, and only the final write says `complete`.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.atomic import replacing
from ffnscope.cache.errors import UserError
from ffnscope.cache.state import DataState, GramCounts, LayerState, RecordingState, Samples, Sparse

_GZIP = dict(compression="gzip", compression_opts=1, shuffle=True)


def put_array(group: h5py.Group, name: str, array: np.ndarray, compress: bool = True) -> None:
    """A dataset with the store's options: gzip level 1 with shuffle, for arrays worth compressing."""
    array = np.ascontiguousarray(array)
    options = _GZIP if compress and array.size >= 4096 else {}
    group.create_dataset(name, data=array, **options)


def empty_array(group: h5py.Group, name: str, shape: tuple, dtype) -> h5py.Dataset:
    """An empty dataset with the options put_array would give the whole array (filled in blocks later)."""
    size = int(np.prod(shape, dtype=np.int64))
    return group.create_dataset(name, shape=shape, dtype=dtype, **(_GZIP if size >= 4096 else {}))


def write_layer(group: h5py.Group, layer: LayerState) -> None:
    """One `layers/NNN` group."""
    for name in schema.LAYER_ARRAYS:
        put_array(group, name, getattr(layer, name))
    if layer.ngram_counted is not None:
        put_array(group, "ngram_counted", layer.ngram_counted)
        for n, sparse in layer.ngrams.items():
            for column in schema.NGRAM_COLUMNS:
                if getattr(sparse, column) is not None:
                    put_array(group, f"ngram{n}/{column}", getattr(sparse, column))


def read_layer(group: h5py.Group) -> LayerState:
    arrays = {k: group[k][:] for k in schema.LAYER_ARRAYS}
    counted = group["ngram_counted"][:] if "ngram_counted" in group else None
    ngrams = {int(k[5:]): read_sparse(group[k]) for k in group if k.startswith("ngram") and k != "ngram_counted"}
    return LayerState(**arrays, ngram_counted=counted, ngrams=ngrams)


def nbytes(value) -> int:
    """Bytes of the arrays and strings in a value (dataclasses, dicts, lists and `arrays` walked): what
    writing it uncompressed takes, the bound a write checks the free space against."""
    if isinstance(value, np.ndarray):
        return value.nbytes + 4096  # the dataset's object header and chunk index
    if isinstance(value, (str, bytes)):
        return len(value) * (1 if isinstance(value, bytes) else 4) + 16
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes(v) + 16 for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if isinstance(getattr(value, "arrays", None), dict):
        return nbytes(value.arrays)
    return 8


@contextmanager
def replaced(path: Path, tag: str = "", copy: bool = False, failure: str | None = None, needs: int = 0):
    """An open HDF5 file that replaces `path` whole when the block ends, through the one writer of our
    files (cache.atomic.replacing: its temporary, space check, fsync, rename and one-line errors).
    `needs`: bytes of the data the block writes (nbytes)."""
    with replacing(path, tag, copy, failure, needs) as tmp, h5py.File(tmp, "a" if copy else "w") as f:
        yield f
        f.flush()  # the buffered writes now, so a full disk fails inside the write: one line, temporary gone


def write_state(path: Path, state: RecordingState, status: str, needs: int | None = None) -> None:
    """`state.layers` is read once, in order, through .items(): a mapping that makes each layer when asked
    (tests/synthetic_cache.py) is written without the whole recording in memory; it then gives `needs`,
    the bytes the write takes (default: nbytes(state))."""
    with replaced(path, failure=f"could not write {path}", needs=nbytes(state) if needs is None else needs) as f:
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
            write_layer(f.create_group(schema.layer_group(index)), layer)
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
        fix = ("record it again (older caches rank contexts by g and lack the g sums suppression needs)"
               if version < schema.SCHEMA_VERSION else "upgrade ffnscope or record again")
        raise UserError(f"{path} uses cache schema v{version}, this ffnscope reads v{schema.SCHEMA_VERSION}; {fix}")
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


def read_sparse(group: h5py.Group) -> Sparse:
    """One `ngram{n}` group (g_sum only where the order carries it)."""
    g_sum = group["g_sum"][:] if "g_sum" in group else None
    return Sparse(group["gram"][:], group["neuron"][:], group["count"][:].astype(np.int64), g_sum)


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
            layers = {int(name): read_layer(group) for name, group in f["layers"].items()}
            samples = Samples(f["samples/index"][:], f["samples/acts"][:])
            return RecordingState(meta, dict(sorted(layers.items())), data_state, samples,
                                  int(f.attrs["shards_done"]), str(f.attrs["status"]),
                                  read_strings(f, "tokenizer/vocab"), read_strings(f, "tokenizer/pieces"))
        except (KeyError, ValueError, OSError) as exc:
            raise UserError(f"{path} is damaged ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
                            "record it again") from None
