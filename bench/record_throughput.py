"""Recording throughput against a bare forward pass on the same tokens, where the time goes, the calibration's
cost, and the weight traffic of layer-major streaming against per-batch offloading, in one run.

    python bench/record_throughput.py [--model default] [--tokens 8192] [--repeat 3] [--skip-streaming]

Bare forward passes (the base model, no LM head) and recordings (every layer, n-gram statistics on the first
half, checkpoints on their cadence) alternate, --repeat times: this machine's speed drifts between minutes,
so each recording is compared with the bare passes right before and after it. A recording is what a job runs
after its calibration: the shards with their segments and checkpoints; the final (compressed) write follows
and is timed apart. Each run prints its ratio and its profile beside it:

    forward     LayerRunner.run without the probe's callbacks (the layers' own compute)
    hooks       the probe's callbacks and take() (what reading g and act costs)
    statistics  LayerStats.update (the fused per-batch kernels, the n-gram pairs)
    layer ends  LayerStats.to_host and take_samples (pairs merged over the shard's batches)
    embed       the embeddings and each batch's context (n-gram keys and tables)
    segments    each shard's segment and its fold into the checkpoint's maps
    checkpoints the checkpoints of the fixed-size statistics
    other       the rest (the wall time minus the above)

Then: the calibration as the job runs it on this data (the default sample: engine.record.config.
default_calib_tokens) and, measured on a 32,768-token sample (what a 1M-token recording calibrates on), its
share of a 1M-token recording at the recording speed measured here. With streaming (not --skip-streaming):
throughput under a device budget of --budget-layers layers, and the bytes of the streamed layers' weights moved
per token by layer-major streaming and by accelerate's cpu_offload (counted on the same layers' weights, by
wrapping its tensor mover) on the same batches.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ffnscope.engine.data.packing import pack, special_ids  # noqa: E402
from ffnscope.engine.data.sources import open_sources  # noqa: E402
from ffnscope.engine.model import hooks as hooks_module, runner as runner_module  # noqa: E402
from ffnscope.engine.model.load import load_model  # noqa: E402
from ffnscope.engine.model.plan import plan_device  # noqa: E402
from ffnscope.engine.model.runner import param_bytes  # noqa: E402
from ffnscope.engine.record import block as block_module, executor, job, stats as stats_module  # noqa: E402
from ffnscope.engine.record.config import RecordConfig, default_calib_tokens  # noqa: E402
from ffnscope.engine.record.executor import Recorder  # noqa: E402
from ffnscope.engine.record.meta import build_meta  # noqa: E402

PHASES = ("forward", "hooks", "statistics", "layer ends", "embed", "segments", "checkpoints")
CALIB_1M = 32768  # the calibration sample of a 1M-token recording (default_calib_tokens)


def timed(seconds: Counter, owner, name: str, phase: str) -> tuple:
    """`owner.name` wrapped to add its seconds to seconds[phase] -> (owner, name, the real one, the wrapper)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            seconds[phase] += time.perf_counter() - t
    return owner, name, real, wrapper


@contextmanager
def profiled(seconds: Counter):
    """Time the recording's phases into `seconds` by wrapping the functions that do them (nothing in the engine
    knows it is timed)."""

    def keep(self, name):  # the probe's callbacks: run inside the layer's forward
        real = real_keep(self, name)

        def callback(k, t):
            t0 = time.perf_counter()
            real(k, t)
            seconds["callbacks"] += time.perf_counter() - t0
        return callback
    real_keep = hooks_module.FFNProbe._keep
    patches = [timed(seconds, *where) for where in (
        (runner_module.LayerRunner, "run", "forward"), (hooks_module.FFNProbe, "take", "hooks"),
        (stats_module.LayerStats, "update", "statistics"), (stats_module.LayerStats, "to_host", "layer ends"),
        (stats_module.LayerStats, "take_samples", "layer ends"), (block_module.BlockRunner, "_embed", "embed"),
        (executor, "write_segment", "segments"), (executor, "fold_segments", "segments"),
        (Recorder, "_checkpoint", "checkpoints"))] + [(hooks_module.FFNProbe, "_keep", real_keep, keep)]
    for owner, name, _real, wrapper in patches:
        setattr(owner, name, wrapper)
    try:
        yield seconds
    finally:
        for owner, name, real, _wrapper in patches:
            setattr(owner, name, real)


def bare_forward(lm, tokens: np.ndarray, per_batch: int) -> float:
    ids = torch.as_tensor(tokens.astype(np.int64))
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(ids), per_batch):
            lm.adapter.base(input_ids=ids[lo:lo + per_batch], use_cache=False)
    return time.perf_counter() - start


def calibration_seconds(config, lm, meta, tokens, domains, calib_tokens: int) -> float:
    """The calibration a job runs before its first shard, on a sample of `calib_tokens`."""
    meta = {**meta, "recording": {**meta["recording"], "calib_tokens": calib_tokens}}
    recorder = Recorder(config, lm, meta, torch.device("cpu"), len(lm.adapter.layers), domains)
    t0 = time.perf_counter()
    recorder.calibrate(tokens)
    return time.perf_counter() - t0


def run_recording(config, lm, meta, tokens, domains, resident: int, counted: dict):
    """The shards as a job records them after its calibration (`counted`: what it decided), profiled ->
    (recording s, final write s, phase seconds, recorder)."""
    recorder = Recorder(config, lm, meta, torch.device("cpu"), resident, domains)
    state = job.empty_state(meta, counted)
    with profiled(Counter()) as seconds:
        t0 = time.perf_counter()
        recorder.record_shards(state, tokens, 0)
        t1 = time.perf_counter()
    job.write_complete(config.out, state, recorder)
    recorder.release_buffers()
    seconds["forward"] -= seconds["callbacks"]  # they ran inside the forward
    seconds["hooks"] += seconds.pop("callbacks")
    return t1 - t0, time.perf_counter() - t1, seconds, recorder


def accelerate_offload_bytes(lm, tokens: np.ndarray, per_batch: int, n_batches: int, layers: list[int]) -> int:
    """Bytes of the given decoder layers' weights that accelerate's cpu_offload moves to the execution device
    for the first batches."""
    import accelerate.hooks as hooks
    from accelerate import cpu_offload

    counted = {id(m) for i in layers for m in lm.adapter.layers[i].modules()}
    moved = {"bytes": 0}
    original = hooks.set_module_tensor_to_device

    def counting(module, name, device, value=None, *args, **kwargs):
        if value is not None and id(module) in counted:
            moved["bytes"] += value.numel() * value.element_size()
        return original(module, name, device, value, *args, **kwargs)

    hooks.set_module_tensor_to_device = counting
    try:
        model = cpu_offload(lm.adapter.base, execution_device=torch.device("cpu"))
        ids = torch.as_tensor(tokens.astype(np.int64))
        with torch.inference_mode():
            for lo in range(0, min(len(ids), n_batches * per_batch), per_batch):
                model(input_ids=ids[lo:lo + per_batch], use_cache=False)
    finally:
        hooks.set_module_tensor_to_device = original
    return moved["bytes"]


def warm_up(lm, tokens, per_batch: int, seq_len: int) -> None:
    """JIT-compile the CPU kernels and touch the weights once, outside every timing."""
    from ffnscope.engine.record.grams import GramTable, gram_keys

    keys, valid = gram_keys(tokens[:1], int(tokens.max()) + 1, 1)
    ctx = stats_module.BatchContext(seq_start=torch.zeros(1, dtype=torch.int64),
                                    gram_keys={n: torch.as_tensor(k.reshape(-1)) for n, k in keys.items()},
                                    gram_valid={n: torch.as_tensor(v.reshape(-1)) for n, v in valid.items()},
                                    sample_rows=torch.zeros(0, dtype=torch.int64), seq_len=seq_len,
                                    gram_table=GramTable.of(keys, valid))
    stats = stats_module.LayerStats(64, seq_len, [-1.0], 0, 1, torch.device("cpu"), np.ones(64, bool))
    g = torch.zeros(seq_len, 64)
    stats.update(g, g, ctx)
    stats.to_host()
    bare_forward(lm, tokens[:per_batch], per_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--shard-tokens", type=int, help="default: the job's (engine.record.config)")
    parser.add_argument("--budget-layers", type=int, default=2)
    parser.add_argument("--skip-streaming", action="store_true")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="alternating bare/recording pairs")
    args = parser.parse_args()

    from ffnscope.engine.record.config import default_shard_tokens

    lm = load_model(args.model)
    start_id, sep_id = special_ids(lm.tokenizer)
    sources = open_sources(["builtin"])
    packed = pack(sources.documents(), lm.tokenizer, args.seq_len, args.tokens // args.seq_len, start_id, sep_id)
    tokens = packed.tokens
    n_tok = tokens.size
    per_batch = max(1, args.batch_tokens // args.seq_len)
    shard_tokens = args.shard_tokens or default_shard_tokens(n_tok, args.seq_len, args.batch_tokens)
    out = Path(tempfile.mkdtemp()) / "bench.h5"
    config = RecordConfig(out=out, model=args.model, tokens=n_tok, seq_len=args.seq_len,
                          batch_tokens=args.batch_tokens, shard_tokens=shard_tokens, device="cpu")
    meta = build_meta(config, lm, sources, packed, args.seq_len, start_id, sep_id)
    meta["recording"]["ngram_bound"], _ = job.ngram_bound(tokens, meta)
    rec = meta["recording"]
    print(f"model {lm.name}: {len(lm.adapter.layers)} layers, d_ffn {lm.adapter.d_ffn}; {n_tok} tokens in "
          f"{len(tokens)} sequences of {args.seq_len}; batches of {per_batch} sequences, shards of {shard_tokens} "
          f"tokens ({rec['n_shards']}); n-gram layers {rec['ngram_layers'][0]}-{rec['ngram_layers'][-1]}; "
          f"torch threads {torch.get_num_threads()}")
    warm_up(lm, tokens, per_batch, args.seq_len)
    # what the job's calibration decides (the n-gram neurons counted from the start), once, untimed
    counted = Recorder(config, lm, meta, torch.device("cpu"), len(lm.adapter.layers), packed.domains).calibrate(tokens)
    print(f"n-gram neurons counted from the start: {sum(int(c.sum()) for c in counted.values())} of "
          f"{len(counted) * lm.adapter.d_ffn} (calibration sample {rec['calib_tokens']} tokens)")

    bares, runs = [bare_forward(lm, tokens, per_batch)], []
    for r in range(args.repeat):
        rec_s, final_s, seconds, recorder = run_recording(config, lm, meta, tokens, packed.domains,
                                                          len(lm.adapter.layers), counted)
        bares.append(bare_forward(lm, tokens, per_batch))
        around = (bares[-2] + bares[-1]) / 2
        runs.append((rec_s, final_s, around / rec_s))
        other = rec_s - sum(seconds[p] for p in PHASES)
        profile = ", ".join(f"{p} {seconds[p]:.1f}" for p in PHASES)
        print(f"run {r + 1}: bare {bares[-2]:.1f} / {bares[-1]:.1f} s, recording {rec_s:.1f} s: ratio "
              f"{around / rec_s:.3f}; final write {final_s:.1f} s (ratio with it {around / (rec_s + final_s):.3f})")
        print(f"  profile s: {profile}, other {other:.1f}; forward / bare {seconds['forward'] / around:.3f}")
    ratios = [r[2] for r in runs]
    rec_med = float(np.median([r[0] for r in runs]))
    print(f"bare forward {n_tok / float(np.median(bares)):.1f} tok/s; recording {n_tok / rec_med:.1f} tok/s; "
          f"ratio median {float(np.median(ratios)):.3f} of {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"final write median {float(np.median([r[1] for r in runs])):.1f} s")
    print(f"  cache size {out.stat().st_size / 2**20:.1f} MiB")

    if not args.skip_calibration:
        job_calib = default_calib_tokens(n_tok, args.seq_len)
        calib = calibration_seconds(config, lm, meta, tokens, packed.domains, job_calib)
        print(f"calibration as the job runs it (sample {job_calib} tokens): {calib:.1f} s, "
              f"{calib / rec_med:.1%} of this recording")
        if len(tokens) * args.seq_len >= CALIB_1M:
            calib_1m = calibration_seconds(config, lm, meta, tokens, packed.domains, CALIB_1M)
            recording_1m = rec_med * 1_000_000 / n_tok
            print(f"calibration of a 1M-token recording (sample {CALIB_1M} tokens, measured here): {calib_1m:.1f} s, "
                  f"{calib_1m / recording_1m:.1%} of its recording at this speed ({recording_1m:.0f} s)")

    if args.skip_streaming:
        return
    layers = list(lm.adapter.layers)
    fixed = param_bytes(lm.adapter.base) - sum(param_bytes(layer) for layer in layers)
    budget = fixed + args.budget_layers * max(param_bytes(layer) for layer in layers)
    resident = plan_device(budget, lm, torch.device("cpu"), args.batch_tokens)
    config_s = RecordConfig(**{**config.__dict__, "out": out.with_name("stream.h5")})
    stream_s, _final, _seconds, streamer = run_recording(config_s, lm, meta, tokens, packed.domains, resident,
                                                         counted)
    print(f"streaming (budget {args.budget_layers} layers: {resident} resident, the rest stream): "
          f"{n_tok / stream_s:.1f} tok/s; ratio to all-resident {rec_med / stream_s:.3f}")
    n_batches = 2
    streamed = list(range(resident, len(layers)))
    offload = accelerate_offload_bytes(lm, tokens, per_batch, n_batches, streamed) / (n_batches * per_batch *
                                                                                      args.seq_len)
    ours = streamer.runner.bytes_moved / n_tok
    print(f"weight bytes of the {len(streamed)} streamed layers moved per token: layer-major streaming {ours:,.0f} "
          f"(once per shard of {min(shard_tokens, n_tok)} tokens); accelerate cpu_offload {offload:,.0f} (once per "
          f"batch of {args.batch_tokens} tokens); ratio {offload / max(ours, 1e-9):.1f}x")


if __name__ == "__main__":
    main()
