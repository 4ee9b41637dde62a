"""Peak host memory of a recording against the budget it was given.

    python bench/host_memory.py [--tokens 1000000] [--host-memory 4GiB] [--model default]

Runs `ffnscope record` in a child process with --host-memory and prints the child's peak resident
set size (getrusage of the children), the budget, whether hidden states went to disk, and the
recording's throughput.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ffnscope.engine.units import human, parse_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--host-memory", default="4GiB")
    parser.add_argument("--out", type=Path)
    parser.add_argument("extra", nargs="*", help="more `ffnscope record` options, after --")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp()) / "memory.h5"
    budget = parse_bytes(args.host_memory, "--host-memory")
    cmd = [sys.executable, "-m", "ffnscope", "record", "--model", args.model, "--tokens", str(args.tokens),
           "--out", str(out), "--force", "--quiet", "--host-memory", str(budget), *args.extra]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.time() - start
    if done.returncode != 0:
        sys.exit(f"recording failed: {done.stderr.strip()[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    import h5py

    with h5py.File(out, "r") as f:
        rec = json.loads(f.attrs["meta"])["recording"]
        tokens = f["data/tokens"].size
    print(f"tokens recorded     {tokens:,} in {elapsed:.0f} s ({tokens / elapsed:.0f} tok/s, model load included)")
    print(f"host budget         {human(budget)}")
    print(f"peak host memory    {human(peak)} ({peak / budget:.2f} of the budget) -> "
          f"{'within' if peak <= budget else 'OVER'} budget")
    print(f"hidden states on disk: {rec['hidden_on_disk']}; cache size {human(out.stat().st_size)}")


if __name__ == "__main__":
    main()
