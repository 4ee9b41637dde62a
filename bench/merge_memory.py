"""Peak memory of `ffnscope merge` against the number of parts.

    python bench/merge_memory.py [--part-mb 256] [--layers 8] [--seq-len 256] [--dir DIR]

Writes synthetic part caches (cache.store.write_state, random arrays of a recording's shapes and
dtypes) of about --part-mb MB each (uncompressed): a split into 2 and a split into 4. Each merge runs
in a fresh child process, which prints its peak resident set size (VmHWM) and the size before
the merge (Python, numpy, h5py loaded). Prints both and the ratio 4-part / 2-part: flat is the goal.
The parts: tests/fixtures/parts.py.
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

from tests.fixtures.parts import TAUS, synthetic_parts  # noqa: E402

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
    per_neuron = 4 * T + 8 * len(TAUS) + 20 + 16 * k + 16 + 1 + 12 * 28 + 4 * samples  # samples are float32
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
