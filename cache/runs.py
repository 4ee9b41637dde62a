"""n-gram (gram, neuron) pairs as sorted runs on disk, summed once (issue 11).

While recording, each shard's pairs of each n-gram layer and order (a Sparse: sorted, keys unique) go
into that shard's segment file (cache.store) as `pairs/LLL/ngramN/{gram,neuron,count[,g_sum]}`, written
once: nothing keeps them in memory or rewrites them. A checkpoint's `layers/LLL/ngramN` datasets are
virtual datasets over its segments' runs, concatenated in data order, and the group says so (attribute
RUNS_ATTR): a reader sums them on read (cache.store.read_sparse). The complete cache's datasets come from
one streamed k-way merge of the runs (merged_chunks), whose memory is bounded by MERGE_PAIRS pairs
whatever the number of runs. Every key's rows are summed in the runs' order (Sparse.reduce's rule), and
neurons the recording stopped counting are dropped last, so the result equals folding the shards into
one Sparse in memory, bit for bit.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache.state import G_ORDERS, NGRAM_ORDERS, Sparse

RUNS_ATTR = "unsummed_runs"  # on a checkpoint's ngramN group: rows are runs to sum (and drop) on read
MERGE_PAIRS = 1 << 22        # pairs read at a time by the final merge, all runs together (~100 MiB)
_LIKE = Sparse.empty(True)   # the dtypes of the columns, as the recorder makes them


def run_key(layer: int, n: int) -> str:
    return f"pairs/{layer:03d}/ngram{n}"


def columns(n: int) -> tuple[str, ...]:
    return ("gram", "neuron", "count", "g_sum") if n in G_ORDERS else ("gram", "neuron", "count")


def put_runs(f: h5py.File, pairs: dict[int, dict[int, Sparse]]) -> dict[str, tuple]:
    """One run per layer and order into a segment file, uncompressed -> {run key: (rows,)}."""
    shapes = {}
    for layer, orders in pairs.items():
        for n, sparse in orders.items():
            for column in columns(n):
                f.create_dataset(f"{run_key(layer, n)}/{column}", data=np.ascontiguousarray(getattr(sparse, column)))
            shapes[run_key(layer, n)] = (len(sparse),)
    return shapes


def put_virtual_pairs(group: h5py.Group, layer: int, cache_dir_name: str, segments) -> None:
    """A checkpoint's `ngramN/*` of one layer: each column the concatenation of the segments' runs
    (segments: cache.store.Segment, with `shapes` holding the run lengths; names relative to the cache)."""
    for n in NGRAM_ORDERS:
        key = run_key(layer, n)
        held = [(s, s.shapes[key][0]) for s in segments if s.shapes.get(key, (0,))[0]]
        total = sum(rows for _, rows in held)
        sub = group.create_group(f"ngram{n}")
        sub.attrs[RUNS_ATTR] = True
        for column in columns(n):
            dtype = getattr(_LIKE, column).dtype
            if not total:  # HDF5 maps nothing into an empty dataset
                sub.create_dataset(column, data=np.zeros(0, dtype))
                continue
            layout, offset = h5py.VirtualLayout((total,), dtype), 0
            for segment, rows in held:
                layout[offset:offset + rows] = h5py.VirtualSource(f"{cache_dir_name}/{segment.name}",
                                                                  f"{key}/{column}", (rows,))
                offset += rows
            sub.create_virtual_dataset(column, layout)


def sum_runs(raw: Sparse, counted: np.ndarray, with_g: bool) -> Sparse:
    """Concatenated runs (data order) -> their sum, the neurons no longer counted dropped."""
    return Sparse.reduce([raw], with_g).drop_neurons(counted)


def merged_chunks(runs: list[h5py.Group], counted: np.ndarray, with_g: bool, budget: int | None = None):
    """Yield the sum of sorted runs (in data order) as Sparse chunks of ascending, disjoint gram ranges,
    neurons not `counted` dropped; about `budget` pairs are held at a time, each read once. Every run
    keeps a buffer of its next `block` rows; each step takes from every buffer its rows below one bound
    gram, the smallest gram just past any run's buffer, so no row of that gram is left unread. A run
    holds a gram at most d_ffn times (keys are unique), so a block of d_ffn + 1 rows always moves on."""
    runs = [r for r in runs if r["gram"].shape[0]]
    if not runs:
        return
    block = max(len(counted) + 1, (budget or MERGE_PAIRS) // len(runs))
    names = columns(1 if with_g else 2)
    length = [r["gram"].shape[0] for r in runs]
    read = [0] * len(runs)                              # rows of each run read so far
    buffers = [{name: np.zeros(0, getattr(_LIKE, name).dtype) for name in names} for _ in runs]
    while True:
        bound = None
        for i, r in enumerate(runs):
            buffer = buffers[i]
            if len(buffer["gram"]) < block and read[i] < length[i]:
                stop = min(read[i] + block - len(buffer["gram"]), length[i])
                for name in names:
                    buffer[name] = np.concatenate([buffer[name], r[name][read[i]:stop]])
                read[i] = stop
            if read[i] < length[i]:
                past = int(r["gram"][read[i]])
                bound = past if bound is None else min(bound, past)
        parts = []
        for buffer in buffers:
            take = len(buffer["gram"]) if bound is None else int(np.searchsorted(buffer["gram"], bound, "left"))
            if take:
                parts.append(Sparse(*(buffer[name][:take] for name in names), *(() if with_g else (None,))))
                for name in names:
                    buffer[name] = buffer[name][take:]
        if not parts and bound is None:
            return
        yield Sparse.reduce(parts, with_g).drop_neurons(counted)


def spill_merged(chunks, directory: Path, with_g: bool) -> tuple[int, dict[str, Path]]:
    """Write merged chunks to one raw file per column in `directory` (the final file's datasets are
    created once the length is known, with the store's usual layout) -> (rows, column -> file)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = columns(1 if with_g else 2)
    files = {name: directory / f"merge.{name}.raw" for name in names}
    handles = {name: open(path, "wb") for name, path in files.items()}
    rows = 0
    try:
        for chunk in chunks:
            for name in names:
                getattr(chunk, name).astype(getattr(_LIKE, name).dtype, copy=False).tofile(handles[name])
            rows += len(chunk)
    finally:
        for handle in handles.values():
            handle.close()
    return rows, files


class CachePairs(Mapping):
    """A complete cache's n-gram pairs of one layer, read when asked (order -> Sparse): what a finished
    recording hands back instead of holding every pair in memory."""

    def __init__(self, path: Path, layer: int):
        self.path, self.layer = Path(path), layer

    def __getitem__(self, n: int) -> Sparse:
        from ffnscope.cache import schema
        from ffnscope.cache.store import read_sparse

        if n not in NGRAM_ORDERS:
            raise KeyError(n)
        with h5py.File(self.path, "r") as f:
            return read_sparse(f[schema.layer_group(self.layer)][f"ngram{n}"])

    def __iter__(self):
        return iter(NGRAM_ORDERS)

    def __len__(self) -> int:
        return len(NGRAM_ORDERS)
