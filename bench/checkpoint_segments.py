"""What naming many segments costs a checkpoint, with and without maps (issue 18; cache.store.fold_segments).

    python bench/checkpoint_segments.py [--segments 100 400 1600] [--ngram-layers 1]

Drives the store directly (no model): one tiny segment named N times, the way a checkpoint names a
recording's N shards. Each named file is a source of every stream and n-gram run dataset (~45 us each),
so without maps a checkpoint's cost grows with the shards; folded into maps of MAP_FANOUT it stays flat.
Prints seconds per checkpoint both ways, and the seconds all the folding took.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ffnscope.cache import schema  # noqa: E402
from ffnscope.cache.state import (G_ORDERS, NGRAM_ORDERS, DataState, GramCounts, LayerState,  # noqa: E402
                                  PosIncrements, RecordingState, Samples, Sparse)
from ffnscope.cache.store import Segment, fold_segments, write_segment, write_state  # noqa: E402

SEQ_LEN, D_FFN, SEQS = 4, 8, 2  # a shard's: tiny, the cost measured is the naming


def _data(n_seqs: int) -> DataState:
    empty = GramCounts(np.zeros(0, np.int64), np.zeros(0, np.int64))
    return DataState(np.zeros((n_seqs, SEQ_LEN), np.int32), np.arange(n_seqs), np.zeros((n_seqs, SEQ_LEN), np.uint8),
                     np.zeros(10, np.int64), {n: empty for n in (2, 3)})


def _state(layers: int, ngram_layers: int, n_seqs: int) -> RecordingState:
    made = {i: LayerState.zeros(1, D_FFN, SEQ_LEN, 2, np.ones(D_FFN, bool) if i < ngram_layers else None)
            for i in range(layers)}
    return RecordingState({}, made, _data(n_seqs), Samples(np.zeros(0, np.int64), np.zeros((layers, 0, D_FFN))), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--ngram-layers", type=int, default=1)
    args = parser.parse_args()
    layers = max(2, args.ngram_layers)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "c.h5"
        pairs = {i: {n: Sparse(np.arange(3), np.zeros(3, np.int32), np.ones(3, np.int64),
                               np.ones(3) if n in G_ORDERS else None) for n in NGRAM_ORDERS}
                 for i in range(args.ngram_layers)}
        shard = write_segment(out, "000000", _data(SEQS), _state(layers, 0, 0).samples, pairs)
        print(f"{args.ngram_layers} n-gram layers; seconds per checkpoint naming N segments")
        print("      N   unfolded   folded  names  folding (all)")
        for count in args.segments:
            state = _state(layers, args.ngram_layers, SEQS * count)
            timings = []
            t = time.perf_counter()
            named = []
            for done in range(1, count + 1):
                named = fold_segments(out, named + [Segment(shard.name, shard.shapes)], done)
            folding = time.perf_counter() - t
            for segments in ([shard] * count, named):
                t = time.perf_counter()
                write_state(out, state, schema.PARTIAL, compress=False, segments=segments, increments=PosIncrements())
                timings.append(time.perf_counter() - t)
            print(f"{count:7d}  {timings[0]:9.3f}  {timings[1]:7.3f}  {len(named):5d}  {folding:7.2f}")


if __name__ == "__main__":
    main()
