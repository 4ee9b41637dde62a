"""Time and peak memory of `analyze` on a recording, every analysis computed from scratch.

    python bench/analyze_time.py CACHE.h5

Works on a copy (the original keeps its stored analyses). Prints the time of each analysis, the
total, the process's peak resident memory, and for scale what one dense (vocabulary x neurons)
count array per n-gram layer would take.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py  # noqa: E402

from ffnscope.cache.reader import CacheReader  # noqa: E402
from ffnscope.cache.schema import ANALYSES  # noqa: E402
from ffnscope.engine.analysis.job import analyze  # noqa: E402
from ffnscope.engine.units import human  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp()) / args.cache.name
    shutil.copyfile(args.cache, work)
    with h5py.File(work, "a") as f:  # a scratch copy: drop stored analyses so all are computed
        if "analysis" in f:
            del f["analysis"]
    with CacheReader(work) as reader:
        meta = reader.meta
        n_tokens = reader.n_tokens
    marks = [time.perf_counter()]
    started: list[str] = []

    def log(message: str) -> None:
        marks.append(time.perf_counter())
        started.append(message.split(": ")[-1])

    start = time.perf_counter()
    analyze(work, log=log)
    total = time.perf_counter() - start
    marks.append(start + total)
    print(f"cache: {meta['model']['name']}, {n_tokens:,} tokens, {len(meta['recording']['layers'])} layers, "
          f"n-gram layers {len(meta['recording']['ngram_layers'])}")
    for name, (a, b) in zip(started, zip(marks[1:], marks[2:])):
        print(f"  {name:12s} {b - a:6.1f} s")
    print(f"analyze total  {total:.1f} s (all of {', '.join(ANALYSES)}, storing included)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dense = meta["model"]["vocab_size"] * meta["model"]["d_ffn"] * 8 * len(meta["recording"]["ngram_layers"])
    print(f"peak memory    {human(peak)} (dense vocabulary x neurons int64 counts for all n-gram layers "
          f"would be {human(dense)})")


if __name__ == "__main__":
    main()
