"""Peak memory of `ffnscope merge` against the number of parts.

    python bench/merge_memory.py [--part-mb 256] [--layers 8] [--seq-len 256] [--dir DIR]

Writes synthetic part caches (cache.store.write_state, random arrays of a recording's shapes and
dtypes) of about --part-mb MB each (uncompressed): a split into 2 and a split into 4. Each merge runs
in a fresh child process, which prints its peak resident set size (VmHWM) and the size before
the merge (Python, numpy, h5py loaded). Prints both and the ratio 4-part / 2-part: flat is the goal.
From Python: `synthetic_parts(directory, n_parts, ...)` (tests use it).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ffnscope.cache import schema  # noqa: E402
from ffnscope.cache.state import (G_ORDERS, NGRAM_ORDERS, DataState, GramCounts, LayerState,  # noqa: E402
                                  RecordingState, Samples, Sparse)
from ffnscope.cache.store import write_state  # noqa: E402

VOCAB = 1000
TAUS = [0.0, 0.5, 1.0, 2.0]


def _meta(layers: int, seq_len: int, n_seqs_total: int, k: int, part: tuple[int, int], seq_range, fires_cap: int):
    recording = {"taus": TAUS, "primary_tau": 1.0, "primary_index": 2, "layers": list(range(layers)),
                 "ngram_layers": list(range(layers)), "ngram_max_freq": "auto", "calib_tokens": 0,
                 "topk": k, "sample_rate": 0.01, "n_seqs_total": n_seqs_total, "tau_rule": "fixed",
                 "layer_taus": None, "ngram_bound": {"fires": fires_cap, "tokens": n_seqs_total * seq_len},
                 "part": list(part), "seq_range": list(seq_range), "shard_tokens": seq_len * 4,
                 "part_tokens": (seq_range[1] - seq_range[0]) * seq_len}
    return {"model": {"fingerprint": "synthetic", "dtype": "float32"},
            "data": {"fingerprint": "synthetic", "seq_len": seq_len}, "recording": recording}


def _sparse(rng, d_ffn: int, pairs: int, with_g: bool) -> Sparse:
    gram = rng.integers(0, VOCAB ** 2, pairs)
    neuron = rng.integers(0, d_ffn, pairs).astype(np.int32)
    count = rng.integers(1, 5, pairs)
    return Sparse.reduce([Sparse(gram, neuron, count, rng.random(pairs) if with_g else None)], with_g)


def _layer(rng, d_ffn: int, seq_len: int, k: int, lo: int, hi: int) -> LayerState:
    """Random statistics of sequences [lo, hi): top-k on a coarse grid (ties), indices inside the part."""
    fire = np.sort(rng.integers(0, 50, (len(TAUS), d_ffn)), axis=0)[::-1].copy()
    value = -np.sort(-np.round(rng.exponential(1.0, (k, d_ffn)) * 2) / 2, axis=0).astype(np.float32)
    index = rng.integers(lo * seq_len, hi * seq_len, (k, d_ffn))
    value[:, : d_ffn // 8] = 0.0  # ReLU-dead columns: all ties, ranked by index
    order = np.lexsort((index, -value), axis=0)
    value, index = np.take_along_axis(value, order, 0), np.take_along_axis(index, order, 0)
    counted = rng.random(d_ffn) < 0.9
    ngrams = {n: _sparse(rng, d_ffn, 4 * d_ffn, n in G_ORDERS).drop_neurons(counted) for n in NGRAM_ORDERS}
    return LayerState(fire, rng.random(d_ffn), rng.random(d_ffn), rng.random(d_ffn).astype(np.float32),
                      rng.integers(0, 3, (seq_len, d_ffn)).astype(np.int32), value, index,
                      value * 0.5, rng.random(d_ffn).astype(np.float32), np.full(d_ffn, lo * seq_len),
                      rng.random(d_ffn).astype(np.float32), counted, ngrams)


def synthetic_parts(directory: Path, n_parts: int, layers: int = 2, d_ffn: int = 64, seq_len: int = 16,
                    seqs_per_part: int = 8, samples_per_part: int = 6, k: int = 4, seed: int = 0) -> list[Path]:
    """Write the n_parts part caches of one synthetic recording; -> their paths (part 1 first)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    n_total = n_parts * seqs_per_part
    for i in range(1, n_parts + 1):
        rng = np.random.default_rng([seed, i])
        lo, hi = (i - 1) * seqs_per_part, i * seqs_per_part
        tokens = rng.integers(0, VOCAB, (seqs_per_part, seq_len)).astype(np.int32)
        grams = {n: GramCounts.reduce([GramCounts(rng.integers(0, VOCAB ** n, tokens.size),
                                                  np.ones(tokens.size, np.int64))]) for n in (2, 3)}
        data = DataState(tokens, np.arange(lo, hi, dtype=np.int64), np.zeros(tokens.shape, np.uint8),
                         np.bincount(tokens[:, 1:].ravel(), minlength=VOCAB).astype(np.int64), grams)
        index = np.sort(rng.choice(np.arange(lo * seq_len, hi * seq_len), samples_per_part, replace=False))
        samples = Samples(index, rng.standard_normal((layers, samples_per_part, d_ffn)).astype(np.float16))
        state = RecordingState(_meta(layers, seq_len, n_total, k, (i, n_parts), (lo, hi), 20 * n_parts),
                               {layer: _layer(rng, d_ffn, seq_len, k, lo, hi) for layer in range(layers)},
                               data, samples, shards_done=1, status=schema.COMPLETE,
                               vocab=[f"t{j}" for j in range(VOCAB)], pieces=[f"p{j}" for j in range(VOCAB)])
        paths.append(directory / f"part{i}of{n_parts}.h5")
        write_state(paths[-1], state, schema.COMPLETE)
    return paths


def _peak_rss() -> int:
    """This process's peak resident set size. VmHWM, not getrusage: ru_maxrss survives exec, so a child
    would report its parent's peak (the parts it generated)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _child(out: Path, parts: list[Path]) -> None:
    from ffnscope.cache.merge import merge

    before = _peak_rss()
    start = time.time()
    merge(parts, out, force=True)
    peak = _peak_rss()
    print(json.dumps({"before": before, "peak": peak, "seconds": time.time() - start}))


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part-mb", type=float, default=256, help="uncompressed size of each part")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dir", type=Path, help="where the parts go (default: a new temporary folder)")
    parser.add_argument("--child", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], args.child[1:])
    T, L, k = args.seq_len, args.layers, 16
    seqs, samples = 64, 256
    # bytes per neuron and layer: pos_fire, fire counts, sums, top-k and start slot, ~12 n-gram pairs
    per_neuron = 4 * T + 8 * len(TAUS) + 20 + 16 * k + 16 + 1 + 12 * 28 + 2 * samples
    d_ffn = max(64, int(args.part_mb * 1e6 / (L * per_neuron)))
    directory = args.dir or Path(tempfile.mkdtemp(prefix="merge_memory."))
    print(f"parts of {L} layers x {d_ffn} neurons, seq_len {T}, {seqs} sequences, {samples} samples "
          f"(about {_mb(L * d_ffn * per_neuron)} each, uncompressed), in {directory}")
    peaks = {}
    for n in (2, 4):
        start = time.time()
        parts = synthetic_parts(directory / f"split{n}", n, L, d_ffn, T, seqs, samples, k)
        size = sum(p.stat().st_size for p in parts)
        print(f"{n} parts written in {time.time() - start:.0f} s ({_mb(size)} on disk)")
        done = subprocess.run([sys.executable, __file__, "--child", str(directory / f"merged{n}.h5"),
                               *map(str, parts)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        got = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[n] = got["peak"]
        print(f"merge of {n} parts: peak RSS {_mb(got['peak'])} (before merging {_mb(got['before'])}), "
              f"{got['seconds']:.1f} s")
    print(f"peak ratio 4 parts / 2 parts: {peaks[4] / peaks[2]:.2f}")


if __name__ == "__main__":
    main()
