"""The quick start's job, phase by phase, against a bare forward pass over its tokens, in one run.

    python bench/job_time.py [--tokens 24576] [--model default]

Runs what `ffnscope record --model default --data builtin --tokens N --analyze` runs (engine.record.job.record
with the analyses after it), in this process, with a bare forward pass over the same tokens (the base model, no
LM head, batches of the job's size) before and after it. Prints each phase's seconds (loading and packing,
calibration, the recording's shards, the final write, the analyses) and the job's work (calibration, recording,
final write and analyses) over the mean of the two bare passes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ffnscope.engine.analysis.job import analyze  # noqa: E402
from ffnscope.engine.data.packing import pack, special_ids  # noqa: E402
from ffnscope.engine.data.sources import open_sources  # noqa: E402
from ffnscope.engine.model.load import load_model  # noqa: E402
from ffnscope.engine.record import job  # noqa: E402
from ffnscope.engine.record.config import RecordConfig  # noqa: E402
from ffnscope.engine.record.executor import Recorder  # noqa: E402
from record_throughput import timed  # noqa: E402  (bench/ is on the path: this script's folder)

PHASES = ("calibration", "recording", "final write", "analyses")


def bare_forward(lm, tokens: np.ndarray, batch_tokens: int) -> float:
    ids = torch.as_tensor(tokens.astype(np.int64))
    per_batch = max(1, batch_tokens // tokens.shape[1])
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(ids), per_batch):
            lm.adapter.base(input_ids=ids[lo:lo + per_batch], use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=24576)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    lm = load_model(args.model)
    start_id, sep_id = special_ids(lm.tokenizer)
    tokens = pack(open_sources(["builtin"]).documents(), lm.tokenizer, args.seq_len, args.tokens // args.seq_len,
                  start_id, sep_id).tokens
    config = RecordConfig(out=Path(tempfile.mkdtemp()) / "job.h5", model=args.model, data=["builtin"],
                          tokens=args.tokens, seq_len=args.seq_len, device="cpu")
    bare_forward(lm, tokens[:1], config.batch_tokens)  # first touch of the weights and the batch buffers
    before = bare_forward(lm, tokens, config.batch_tokens)

    seconds: Counter = Counter()
    for owner, name, _real, wrapper in (timed(seconds, Recorder, "calibrate", "calibration"),
                                        timed(seconds, Recorder, "record_shards", "recording"),
                                        timed(seconds, job, "write_complete", "final write")):
        setattr(owner, name, wrapper)

    def after(_state, _progress, lm) -> None:  # as `record --analyze`: with the recorded model
        t = time.perf_counter()
        analyze(config.out, log=lambda *_: None, model=lm)
        seconds["analyses"] += time.perf_counter() - t

    t0 = time.perf_counter()
    job.record(config, log=lambda *_: None, after=after)
    total = time.perf_counter() - t0
    after_s = bare_forward(lm, tokens, config.batch_tokens)
    bare = (before + after_s) / 2
    work = sum(seconds[p] for p in PHASES)
    print(f"{tokens.size} tokens; bare forward {before:.1f} s before, {after_s:.1f} s after "
          f"({tokens.size / bare:.0f} tok/s)")
    print("job: " + ", ".join(f"{p} {seconds[p]:.1f} s" for p in PHASES) +
          f"; loading, packing and the rest {total - work:.1f} s")
    print(f"calibration, recording, final write and analyses: {work:.1f} s = {work / bare:.2f} x the bare forward "
          f"(recording alone {seconds['recording'] / bare:.2f} x)")


if __name__ == "__main__":
    main()
