"""Write and read recording caches (HDF5; cache.schema holds the version and names).

A cache is only ever replaced whole: the new image goes to a temporary file beside it, is
flushed to disk, and is renamed over the old one. A kill at any moment leaves either the previous
checkpoint or the new one, never a torn file, and only the final write says `complete`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.state import DataState, GramCounts, LayerState, RecordingState, Samples, Sparse

_GZIP = dict(compression="gzip", compression_opts=1, shuffle=True)


def put_array(group: h5py.Group, name: str, array: np.ndarray, compress: bool = True) -> None:
    """A dataset with the store's options: gzip level 1 with shuffle, for arrays worth compressing."""
    array = np.ascontiguousarray(array)
    options = _GZIP if compress and array.size >= 4096 else {}
    group.create_dataset(name, data=array, **options)


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


def size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _free(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files beside `path` left by writers that died (kill -9, a crash, a full disk before
    this check existed): `.NAME.PID[.TAG].tmp` of a write, `NAME.progress.json.PID.tmp` of a progress
    file, whose PID is no longer a live process. Those of live processes (this one included) stay."""
    path = Path(path)
    prefixes = (f".{path.name}.", f"{path.name}.progress.json.")
    found = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None or not name.endswith(".tmp"):
            continue
        digits = name[len(prefix):].split(".", 1)[0]
        if not digits.isdigit() or (prefix == prefixes[0] and name[len(prefix):].startswith("progress.json")):
            continue
        if not _alive(int(digits)):
            found.append(path.with_name(name))
    return sorted(found)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # alive, another user's (or not a pid at all: leave it alone)
    try:  # a zombie is dead: it writes nothing more
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:
        return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the stale temporaries beside `path` (stale_temporaries); -> those removed."""
    removed = []
    for tmp in stale_temporaries(path):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
        except OSError:
            continue
    return removed


def storage_error(path: Path, needs: int | None = None, reason: str = "", failure: str | None = None) -> UserError:
    """The one line of a failed or impossible write: the path, why, the free space there and needed."""
    path = Path(path)
    free = _free(path.parent)
    parts = [reason] if reason else []
    if free is not None:
        parts.append(f"{size_text(free)} free there")
    if needs:
        parts.append(f"about {size_text(needs)} needed")
    head = failure or f"could not write {path}"
    space = not reason or "space" in reason.lower() or "quota" in reason.lower() or "errno = 28" in reason
    fix = "free some space or choose another place" if space else "check the place is writable"
    return UserError(f"{head} ({'; '.join(parts)}); {fix}, then run the command again (the previous file "
                     "is unchanged)")


def _needed(path: Path, needs: int, copy: bool) -> int:
    """Free bytes a replacement of `path` needs: the new data uncompressed (or the copy plus it), with
    room for HDF5's own structures."""
    base = path.stat().st_size if copy and path.exists() else 0
    return int((base + needs) * 1.05) + (64 << 10)


@contextmanager
def replaced(path: Path, tag: str = "", copy: bool = False, failure: str | None = None, needs: int = 0):
    """An open HDF5 file that replaces `path` whole when the block ends: a temporary file beside it
    (a copy of `path` when copy=True), flushed to disk, renamed over it. Nothing else ever writes a
    file of ours, so a kill at any moment leaves the old file or the new one, never a torn one.
    `needs`: bytes of the data the block writes (nbytes); when the disk has less room than that (plus
    the copy) the write is refused before it starts, because HDF5 does not survive a full disk
    (it can crash the process). Any storage failure becomes a one-line UserError naming the path and
    the space (`failure` its head); the temporary file is always removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{tag}.tmp")
    need = _needed(path, needs, copy)
    free = _free(path.parent)
    if free is not None and needs and free < need:
        raise storage_error(path, need, "not enough free space", failure)
    try:
        if copy:
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a" if copy else "w") as f:
            yield f
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
        if "No space left" in reason or "errno = 28" in reason:
            reason = "no space left on the device"
        reason = (reason.splitlines() or [exc.__class__.__name__])[0][:200]
        raise storage_error(path, need if needs else None, reason, failure) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_state(path: Path, state: RecordingState, status: str) -> None:
    with replaced(path, failure=f"could not write {path}", needs=nbytes(state)) as f:
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
                    for column in schema.NGRAM_COLUMNS:
                        if getattr(sparse, column) is not None:
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
            layers = {}
            for name, group in f["layers"].items():
                arrays = {k: group[k][:] for k in schema.LAYER_ARRAYS}
                counted = group["ngram_counted"][:] if "ngram_counted" in group else None
                ngrams = {int(k[5:]): read_sparse(group[k]) for k in group
                          if k.startswith("ngram") and k != "ngram_counted"}
                layers[int(name)] = LayerState(**arrays, ngram_counted=counted, ngrams=ngrams)
            samples = Samples(f["samples/index"][:], f["samples/acts"][:])
            return RecordingState(meta, dict(sorted(layers.items())), data_state, samples,
                                  int(f.attrs["shards_done"]), str(f.attrs["status"]),
                                  read_strings(f, "tokenizer/vocab"), read_strings(f, "tokenizer/pieces"))
        except (KeyError, ValueError, OSError) as exc:
            raise UserError(f"{path} is damaged ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
                            "record it again") from None
