"""Merge caches recorded as disjoint parts (`record --part i/n`) of one recording.

The merge streams: it holds one layer of one part beside the layer it accumulates, merges the parts'
n-gram pairs as sorted runs a chunk at a time (cache.runs), and copies token streams and activation
samples block by block, so its memory does not grow with the number of parts.
Parts are added in data order (by their first sequence), whatever order they are given in.
"""
from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.atomic import same_file
from ffnscope.cache.errors import UserError
from ffnscope.cache.state import GramCounts, LayerState, ngram_drop_limit
from ffnscope.cache.store import (empty_array, open_file, put_array, read_layer, read_state, remove_segments, replaced,
                                  segments_dir, write_layer, write_merged_pairs)
from ffnscope.cache.validate import FIX

# recording settings that change what is counted: caches differing in one of them never add up
_SAME_RECORDING = ("taus", "primary_tau", "layers", "ngram_layers", "ngram_max_freq", "calib_tokens",
                   "topk", "sample_rate", "n_seqs_total", "tau_rule")
# derived from the data and model during a run (calibration, n-gram bound): equal for the parts of one
# recording; a resumed run takes them from the cache it continues, so they are compared for merges only
_DERIVED = ("layer_taus", "ngram_bound")
_BLOCK_BYTES = 32 << 20  # rows copied at a time: bounded memory whatever the size of a part
# model fingerprints that cover every weight start with this (engine.model.fingerprint); earlier ones
# covered the config and 8 embedding rows, so two models differing in an FFN weight had one fingerprint
FINGERPRINT_PREFIX = "w2-"


def recorded_before(fingerprint: str) -> bool:
    """A model fingerprint by an ffnscope before FINGERPRINT_PREFIX: it cannot be compared with a current one."""
    return not str(fingerprint).startswith(FINGERPRINT_PREFIX)


def check_fingerprint(recorded: str, loaded: str, what: str, mismatch: str, otherwise: str = "") -> None:
    """Refuse a model whose fingerprint is not the one `what` (a cache, maps) was made with: `mismatch` says
    so, except for a fingerprint by an older ffnscope, which cannot be compared and is said to be that."""
    if loaded == recorded:
        return
    if recorded_before(recorded):
        raise UserError(f"{what} was made by an older ffnscope whose model fingerprint cannot be checked against "
                        f"this model; record it again with this version{otherwise}")
    raise UserError(mismatch + otherwise)


def check_same_recording(old: dict, new: dict, path: Path, for_resume: bool) -> None:
    """Refuse to add up caches of different models, data or settings (one line naming the first)."""
    pairs = [("model", old["model"]["fingerprint"], new["model"]["fingerprint"]),
             ("model dtype", old["model"]["dtype"], new["model"]["dtype"]),
             ("data", old["data"]["fingerprint"], new["data"]["fingerprint"]),
             ("seq_len", old["data"]["seq_len"], new["data"]["seq_len"])]
    pairs += [(key, old["recording"].get(key), new["recording"].get(key)) for key in _SAME_RECORDING]
    if for_resume:
        pairs += [(key, old["recording"][key], new["recording"][key]) for key in ("part", "shard_tokens")]
    else:
        pairs += [(key, old["recording"].get(key), new["recording"].get(key)) for key in _DERIVED]
    for what, a, b in pairs:
        if a != b:
            fix = ("give the same options as the original run, or --force to start over" if for_resume
                   else "merge only parts of one recording")
            if what == "model" and for_resume and recorded_before(a):
                raise UserError(f"{path} has a model fingerprint of an older ffnscope ({a}), which cannot tell "
                                "whether this is the same model; finish it with that version, or --force to "
                                "record it again")
            if what == "model" and (recorded_before(a) or recorded_before(b)):
                raise UserError(f"{path} has a model fingerprint of another ffnscope version than the first part "
                                f"({a} vs {b}); an older one cannot tell whether the models are the same: record "
                                "the older parts again with this version, or merge with the version that "
                                "recorded them")
            raise UserError(f"{path} was recorded with another {what} ({a} vs {b}); {fix}")


@dataclass
class Merged:
    """What a merge wrote: its meta and token count (the arrays stay in the file)."""
    path: Path
    meta: dict
    n_tokens: int

    @property
    def layers(self) -> dict[int, LayerState]:
        """The merged layers, read back from the file whole (for inspection, not for big caches)."""
        return read_state(self.path, "reading the merge").layers


@dataclass
class _Part:
    path: Path
    file: h5py.File
    meta: dict
    seq_index: np.ndarray
    sample_index: np.ndarray


@contextmanager
def _reading(path: Path):
    """A read of a part that fails becomes the one line read_state gives for a damaged cache."""
    try:
        yield
    except (KeyError, ValueError, OSError) as exc:
        raise UserError(f"{path} is damaged ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
                        "record it again") from None


def merge(inputs: list[Path], out: Path, force: bool = False) -> Merged:
    if len(inputs) < 2:
        raise UserError("merge needs at least two part caches")
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; choose another --out or add --force")
    if any(Path(p).resolve() == out.resolve() or same_file(Path(p), out) for p in inputs):  # a link to one too
        raise UserError(f"--out {out} is one of the inputs; write the merge to a new file")
    with ExitStack() as stack:
        parts = []
        for path in map(Path, inputs):
            f = stack.enter_context(open_file(path, "merging"))
            with _reading(path):
                parts.append(_Part(path, f, json.loads(f.attrs["meta"]), f["data/seq_index"][:],
                                   f["samples/index"][:]))
        for part in parts:
            if part.file.attrs.get("status") != schema.COMPLETE:
                raise UserError(f"{part.path} is partial; finish it with `ffnscope record ... --resume` "
                                "before merging")
        meta, seen = _check_parts(parts)
        first = parts[0]
        parts.sort(key=lambda p: int(p.seq_index[0]) if len(p.seq_index) else -1)  # data order
        n_tokens = sum(int(p.file["data/tokens"].size) for p in parts)
        rec = meta["recording"]
        n_parts = rec["part"][1]
        rec["parts"] = sorted([i, n_parts] for i in seen)
        rec["merged_from"] = [str(p) for p in inputs]
        rec["part_tokens"] = n_tokens
        rec["seq_range"] = [min(p.meta["recording"]["seq_range"][0] for p in parts),
                            max(p.meta["recording"]["seq_range"][1] for p in parts)]
        if len(seen) == n_parts:
            rec["part"] = [1, 1]
        with replaced(out, failure=f"could not write {out}", needs=_needs(parts)) as f:
            f.attrs["format"] = schema.FORMAT
            f.attrs["schema_version"] = schema.SCHEMA_VERSION
            f.attrs["status"] = schema.COMPLETE
            f.attrs["shards_done"] = int(first.file.attrs["shards_done"])
            f.attrs["meta"] = json.dumps(meta)
            _write_data(f.create_group("data"), parts)
            limit, primary = ngram_drop_limit(rec), rec["primary_index"]
            for name in first.file["layers"]:
                layer = _merged_layer(parts, name, limit, primary)
                write_layer(f.create_group(schema.layer_group(int(name))), layer,
                            pairs=lambda group, name=name, counted=layer.ngram_counted:
                            _merged_pairs(group, parts, name, counted, out))
            with _reading(first.path):
                f.copy(first.file["tokenizer"], f, name="tokenizer")
            _write_samples(f.create_group("samples"), parts)
    return Merged(out, meta, n_tokens)


def _check_parts(parts: list[_Part]) -> tuple[dict, dict[int, Path]]:
    """Same recording, one split, each part once; -> the first's meta, part number -> its file."""
    first = parts[0].meta
    seen: dict[int, Path] = {}
    for part in parts:
        check_same_recording(first, part.meta, part.path, for_resume=False)
        for number in part.meta["recording"].get("parts", [part.meta["recording"]["part"]]):
            if number[1] != first["recording"]["part"][1]:
                raise UserError(f"{part.path} is part {number[0]}/{number[1]}, not of the same split into "
                                f"{first['recording']['part'][1]} parts; merge parts of one split")
            if number[0] in seen:
                raise UserError(f"{part.path} overlaps {seen[number[0]]} (both hold part {number[0]}/"
                                f"{number[1]}); merge each part once")
            seen[number[0]] = part.path
    return json.loads(json.dumps(first)), seen


def _needs(parts: list[_Part]) -> int:
    """Uncompressed bytes of the merged cache, an upper bound: what grows with the data (token streams,
    samples, n-gram counts) summed over the parts, each layer's fixed-size arrays once."""
    fixed = set(schema.LAYER_ARRAYS) | {"ngram_counted"}
    total = 0
    for i, part in enumerate(parts):
        def visit(name, obj, i=i):
            nonlocal total
            if isinstance(obj, h5py.Dataset) and (i == 0 or not (name.split("/")[-1] in fixed
                                                                 or name.startswith("tokenizer/"))):
                total += obj.size * obj.dtype.itemsize + 4096
        part.file.visititems(visit)
    return total


def _runs(dest: np.ndarray):
    """(source start, source stop, destination start) of each run of consecutive destination rows."""
    if not len(dest):
        return
    breaks = np.flatnonzero(np.diff(dest) != 1) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(dest)]):
        yield int(lo), int(hi), int(dest[lo])


def _destinations(keys: list[np.ndarray]) -> list[np.ndarray]:
    """Where each part's rows go in the merged order (ascending global index)."""
    order = np.argsort(np.concatenate(keys), kind="stable")
    dest = np.empty(len(order), np.int64)
    dest[order] = np.arange(len(order))
    bounds = np.cumsum([0] + [len(k) for k in keys])
    return [dest[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _copy_rows(part: _Part, source: h5py.Dataset, target: h5py.Dataset, dest: np.ndarray, lead=()) -> None:
    """Copy rows (axis len(lead)) of source to rows `dest` of target, a block at a time."""
    row_bytes = max(1, source.dtype.itemsize * int(np.prod(source.shape[len(lead) + 1:], dtype=np.int64)))
    step = max(1, _BLOCK_BYTES // row_bytes)
    for lo, hi, at in _runs(dest):
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            with _reading(part.path):
                block = source[(*lead, slice(a, b))]
            target[(*lead, slice(at + a - lo, at + b - lo))] = block


def _write_data(group: h5py.Group, parts: list[_Part]) -> None:
    dest = _destinations([p.seq_index for p in parts])
    put_array(group, "seq_index", np.sort(np.concatenate([p.seq_index for p in parts]), kind="stable"))
    for name in ("tokens", "domains"):
        like = parts[0].file["data"][name]
        target = empty_array(group, name, (sum(len(p.seq_index) for p in parts), *like.shape[1:]), like.dtype)
        for part, rows in zip(parts, dest):
            _copy_rows(part, part.file["data"][name], target, rows)
    unigram, grams = None, {}
    for part in parts:
        data = part.file["data"]
        with _reading(part.path):
            counts = data["unigram"][:]
            unigram = counts if unigram is None else unigram + counts
            for key in (k for k in data if k.startswith("gram")):
                addend = GramCounts(data[key]["gram"][:], data[key]["count"][:])
                grams[key] = GramCounts.reduce([grams[key], addend]) if key in grams else addend
    put_array(group, "unigram", unigram)
    for key, counts in grams.items():
        put_array(group, f"{key}/gram", counts.gram)
        put_array(group, f"{key}/count", counts.count)


def _merged_layer(parts: list[_Part], name: str, limit: int | None, primary: int) -> LayerState:
    """One layer's fixed-size statistics summed over the parts, read one part at a time (the n-gram
    pairs: _merged_pairs)."""
    layer = None
    for part in parts:
        with _reading(part.path):
            addend = read_layer(part.file["layers"][name], pairs=False)
        if layer is None:
            layer = addend
        else:
            layer.add(addend)
        del addend  # before the next part's layer is read
    layer.drop_ngrams_over(limit, primary)  # as the recorder drops them after each shard
    return layer


def _merged_pairs(group, parts: list[_Part], name: str, counted, out: Path) -> None:
    """One layer's n-gram pairs: each part's (sorted, keys unique) a run, merged in data order, the
    neurons the merged layer no longer counts dropped, as LayerState.add and drop_ngrams_over would."""
    def sources(n, stack):
        return [part.file["layers"][name][f"ngram{n}"] for part in parts]
    try:
        write_merged_pairs(group, sources, counted, segments_dir(out), compress=True)
    except IndexError:  # a neuron past d_ffn: damaged counts (opening checks shapes, not these values)
        raise UserError(f"the n-gram counts of layer {name} in {' or '.join(str(p.path) for p in parts)} hold a "
                        f"neuron out of range; {FIX}") from None
    finally:
        remove_segments(out)  # the scratch (a kill leaves it: remove_stale_segments)


def _write_samples(group: h5py.Group, parts: list[_Part]) -> None:
    """Activation samples in global token order, one layer of one part at a time."""
    dest = _destinations([p.sample_index for p in parts])
    put_array(group, "index", np.sort(np.concatenate([p.sample_index for p in parts]), kind="stable"))
    like = parts[0].file["samples/acts"]
    n = sum(len(p.sample_index) for p in parts)
    shape = (like.shape[0], n, like.shape[2])
    # write_state's layout: chunks of one layer x up to 256 samples, uncompressed
    # the widest of the parts' dtypes: an older float16 part must not turn a float32 part's large values into inf
    dtype = np.result_type(*(p.file["samples/acts"].dtype for p in parts))
    target = group.create_dataset("acts", shape=shape, dtype=dtype,
                                  chunks=(1, max(1, min(n, 256)), shape[2]) if n and shape[0] and shape[2] else None)
    for layer in range(shape[0]):
        for part, rows in zip(parts, dest):
            _copy_rows(part, part.file["samples/acts"], target, rows, lead=(layer,))
