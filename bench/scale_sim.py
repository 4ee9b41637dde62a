"""Peak host memory of a recording against the model's size, under one --host-memory cap (CPU).

    python bench/scale_sim.py [--sizes 1,2,4] [--host-memory 2.5GiB] [--tokens 64] [--assert]

Writes random Llama models of about SIZES GB of weights (bf16 safetensors, one shard per layer, written
a layer at a time so the writer never holds the model) under /tmp, records each with `ffnscope record
--dtype float32` in a child process under the cap, and prints the child's peak resident set size
(wait4's rusage) beside the weights' size: flat is the goal, since decoder layers are read from the files
when they run. Only --host-memory is given: on the CPU the plan keeps as many layers resident as the cap
leaves room for and streams the rest. --assert fails if a peak passes the cap, and also records the
largest model a second time with every weight loaded up front (from_pretrained, no cap) and fails unless
the two caches are equal array for array (tests.helpers.assert_same_cache). The models are deleted
afterwards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from ffnscope.engine.units import human, parse_bytes  # noqa: E402
from tests.fixtures.random_llama import layer_params, write_random_llama  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
             max_position_embeddings=256, tie_word_embeddings=True)  # bf16: 1 GB every 11 layers


# the reference recording: the same CLI with every weight loaded up front (load_model's per_layer=False)
WHOLE = ("import sys; import ffnscope.engine.model.load as load, ffnscope.engine.record.job as job; "
         "real = load.load_model; job.load_model = lambda *a, **k: real(*a, **k, per_layer=False); "
         "from ffnscope.app.cli import main; sys.exit(main(sys.argv[1:]))")


def record(model: Path, out: Path, args, whole: bool = False) -> tuple[int, float, str]:
    """-> (peak RSS bytes of the child, seconds, its stderr tail). whole: every weight in memory, no cap."""
    cmd = [sys.executable, *(["-c", WHOLE] if whole else ["-m", "ffnscope.app.cli"]), "record", "--model",
           str(model), "--data", "builtin",
           "--tokens", str(args.tokens), "--seq-len", "64", "--batch-tokens", "64", "--calib-tokens", "64",
           "--samples", "16", "--topk", "4", "--dtype", "float32", "--device", "cpu", "--quiet",
           *([] if whole else ["--host-memory", args.host_memory]), "--out", str(out),
           "--force"]
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w+") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(child.pid, 0)
        log.seek(0)
        tail = log.read()[-600:]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"recording {model.name} failed:\n{tail}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,4", help="GB of bf16 weights per model, comma separated")
    parser.add_argument("--host-memory", default="2.5GiB")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--assert", dest="check", action="store_true", help="fail if a peak passes the cap")
    args = parser.parse_args()
    cap = parse_bytes(args.host_memory, "--host-memory")
    per_layer = layer_params(SHAPE) * 2
    work = Path(tempfile.mkdtemp(prefix="ffnscope-scale-", dir="/tmp"))
    rows, sizes = [], [float(s) for s in args.sizes.split(",")]
    try:
        for size in sizes:
            n_layers = max(1, round(size * 1e9 / per_layer))
            model = work / f"llama-{n_layers}"
            start = time.perf_counter()
            weights = write_random_llama(model, {**SHAPE, "num_hidden_layers": n_layers})
            written = time.perf_counter() - start
            peak, seconds, _ = record(model, work / f"{model.name}.h5", args)
            rows.append((n_layers, weights, peak, seconds))
            print(f"{n_layers:3d} layers  weights {human(weights):>9} bf16 ({human(2 * weights):>9} as float32)  "
                  f"peak RSS {human(peak):>9}  cap {human(cap)}  record {seconds:5.1f}s  (written in {written:.0f}s)",
                  flush=True)
            if args.check and size == max(sizes):
                from tests.helpers import assert_same_cache

                peak_whole, seconds_whole, _ = record(model, work / "whole.h5", args, whole=True)
                assert_same_cache(work / "whole.h5", work / f"{model.name}.h5")
                print(f"    the same model with every weight loaded up front: peak RSS {human(peak_whole):>9}, "
                      f"{seconds_whole:.1f}s; the two caches are equal array for array")
            shutil.rmtree(model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    spread = max(r[2] for r in rows) - min(r[2] for r in rows)
    print(f"peak RSS spread across sizes: {human(spread)} for {human(rows[-1][1] - rows[0][1])} more weights")
    if args.check and any(peak > cap for _n, _w, peak, _s in rows):
        raise SystemExit(f"a peak RSS passed the --host-memory cap of {human(cap)}")


if __name__ == "__main__":
    main()
