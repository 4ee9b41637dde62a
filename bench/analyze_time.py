"""Time and peak memory of `analyze` on a recording, every analysis computed from scratch.

    python bench/analyze_time.py CACHE.h5 [--repeat N] [--preload]

Works on a copy (the original keeps its stored analyses). Prints the time of each analysis and its
share of the total, suppression's model load apart from its own work, the storing of the results
(engine.analysis.job.analyze writes them with cache.analysis_store.write_results, a copy of the cache),
the process's peak resident memory, and for scale what one dense (vocabulary x neurons) count array
per n-gram layer would take. --repeat runs it N times (a fresh copy each) and prints each figure's
median and range, the machine being shared. --preload loads the recorded model first and hands it to
analyze, as a recording that runs its analyses (`record --analyze`) can: suppression then loads nothing.
torch and transformers are imported before the first run and timed apart: a fresh `ffnscope analyze`
pays that once more (the first model load also imports the model's modeling code), a recording has them.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py  # noqa: E402

from ffnscope.cache import analysis_store  # noqa: E402
from ffnscope.cache.reader import CacheReader  # noqa: E402
from ffnscope.cache.schema import ANALYSES  # noqa: E402
from ffnscope.engine.analysis import job  # noqa: E402
from ffnscope.engine.units import human  # noqa: E402

LOAD, STORE = "model load", "storing"


def timed_run(cache: Path, model) -> dict[str, float]:
    """One analyze of a fresh copy of `cache` -> seconds per step: each analysis (suppression without
    its model load), LOAD, STORE and "total"."""
    work = Path(tempfile.mkdtemp()) / cache.name
    try:
        shutil.copyfile(cache, work)
        with h5py.File(work, "a") as f:  # a scratch copy: drop stored analyses so all are computed
            if "analysis" in f:
                del f["analysis"]
        seconds: dict[str, float] = {}
        marks: list[tuple[str, float]] = []

        def log(message: str) -> None:
            marks.append((message.split(": ")[-1], time.perf_counter()))

        def timing(name: str, function):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            return wrapper

        load, write = job.Analyzer._load_model, analysis_store.write_results
        job.Analyzer._load_model = timing(LOAD, load)
        analysis_store.write_results = timing(STORE, write)
        try:
            start = time.perf_counter()
            job.analyze(work, log=log, **({"model": model} if model is not None else {}))
            end = time.perf_counter()
        finally:
            job.Analyzer._load_model, analysis_store.write_results = load, write
        ends = [t for _, t in marks[1:]] + [end - seconds.get(STORE, 0.0)]
        for (name, t0), t1 in zip(marks, ends):
            seconds[name] = t1 - t0 - (seconds.get(LOAD, 0.0) if name == "suppression" else 0.0)
        seconds["total"] = end - start
        return seconds
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh copy (median printed)")
    parser.add_argument("--preload", action="store_true", help="hand analyze the model already loaded")
    args = parser.parse_args()
    with CacheReader(args.cache) as reader:
        meta = reader.meta
        n_tokens = reader.n_tokens
    start = time.perf_counter()
    import torch  # noqa: F401 - timed apart: a recording has it imported already
    import transformers  # noqa: F401

    imports = time.perf_counter() - start
    model = None
    if args.preload:
        from ffnscope.engine.model.load import load_model

        model = load_model(meta["model"]["spec"], "float32")
    runs = [timed_run(args.cache, model) for _ in range(max(args.repeat, 1))]
    print(f"cache: {meta['model']['name']}, {n_tokens:,} tokens, {len(meta['recording']['layers'])} layers, "
          f"n-gram layers {len(meta['recording']['ngram_layers'])}; {len(runs)} run(s)"
          f"{', model preloaded' if args.preload else ''}")
    total = statistics.median(r["total"] for r in runs)
    steps = list(ANALYSES) + ([] if args.preload else [LOAD]) + [STORE]
    for name in steps:
        values = [r.get(name, 0.0) for r in runs]
        median = statistics.median(values)
        label = f"suppression's {LOAD}" if name == LOAD else name
        spread = f"  (range {min(values):.2f}-{max(values):.2f})" if len(runs) > 1 else ""
        print(f"  {label:24s} {median:6.2f} s  {100 * median / total:5.1f} %{spread}")
    whole = [r["suppression"] + r.get(LOAD, 0.0) for r in runs]
    print(f"  suppression with its model load: {statistics.median(whole):.2f} s, "
          f"{100 * statistics.median(whole) / total:.1f} % of the total")
    totals = [r["total"] for r in runs]
    spread = f"; range {min(totals):.2f}-{max(totals):.2f}" if len(runs) > 1 else ""
    print(f"analyze total  {total:.2f} s (all of {', '.join(ANALYSES)}, storing included{spread})")
    print(f"import torch + transformers {imports:.2f} s, before the runs (a fresh `ffnscope analyze` pays it too)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dense = meta["model"]["vocab_size"] * meta["model"]["d_ffn"] * 8 * len(meta["recording"]["ngram_layers"])
    print(f"peak memory    {human(peak)} (dense vocabulary x neurons int64 counts for all n-gram layers "
          f"would be {human(dense)})")


if __name__ == "__main__":
    main()
