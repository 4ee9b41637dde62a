"""Recording throughput against a bare forward pass, and weight traffic of layer-major streaming
against per-batch offloading, on the same tokens, in one run.

    python bench/record_throughput.py [--model default] [--tokens 32768] [--budget-layers 2]

Prints: bare forward tokens/s (base model, no LM head); recording tokens/s (all layers, n-gram
statistics on the first half, checkpoint included) and the ratio; the same under a device budget
of N layers and its ratio to all-resident; weight bytes moved per token by layer-major streaming
and by accelerate's cpu_offload (counted by wrapping its tensor mover) on the same batches.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ffnscope.engine.model.plan import plan_device  # noqa: E402
from ffnscope.engine.data.sources import open_sources
from ffnscope.engine.data.packing import pack  # noqa: E402
from ffnscope.engine.model.runner import param_bytes  # noqa: E402
from ffnscope.engine.record.meta import build_meta  # noqa: E402
from ffnscope.engine.model.load import load_model  # noqa: E402
from ffnscope.engine.record.config import RecordConfig
from ffnscope.engine.record.job import empty_state, write_complete
from ffnscope.engine.data.packing import special_ids  # noqa: E402
from ffnscope.engine.record.executor import Recorder  # noqa: E402


def bare_forward(lm, tokens: np.ndarray, per_batch: int) -> float:
    ids = torch.as_tensor(tokens.astype(np.int64))
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(ids), per_batch):
            lm.adapter.base(input_ids=ids[lo:lo + per_batch], use_cache=False)
    return time.perf_counter() - start


def run_recording(config, lm, meta, tokens, domains, resident: int) -> tuple[float, float, Recorder]:
    """-> (calibration s, recording s, recorder); recorder.cpu_s: the recording's process CPU seconds (all
    threads: the prefetch's reads count), steadier than wall time on a shared machine."""
    recorder = Recorder(config, lm, meta, torch.device("cpu"), resident, domains)
    t0 = time.perf_counter()
    counted = recorder.calibrate(tokens)
    t1, c1 = time.perf_counter(), time.process_time()
    state = empty_state(meta, counted)
    recorder.runner.bytes_moved = 0  # count the recording's weight traffic, not the calibration's
    recorder.record_shards(state, tokens, 0)
    write_complete(config.out, state, recorder)
    recorder.cpu_s = time.process_time() - c1
    return t1 - t0, time.perf_counter() - t1, recorder


def accelerate_offload_bytes(lm, tokens: np.ndarray, per_batch: int, n_batches: int) -> int:
    """Bytes accelerate's cpu_offload moves to the execution device for the first batches."""
    import accelerate.hooks as hooks
    from accelerate import cpu_offload

    moved = {"bytes": 0}
    original = hooks.set_module_tensor_to_device

    def counting(module, name, device, value=None, *args, **kwargs):
        if value is not None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--shard-tokens", type=int, default=262144)
    parser.add_argument("--budget-layers", type=int, default=2)
    parser.add_argument("--skip-streaming", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="alternating bare/recording pairs")
    args = parser.parse_args()

    lm = load_model(args.model)
    start_id, sep_id = special_ids(lm.tokenizer)
    sources = open_sources(["builtin"])
    packed = pack(sources.documents(), lm.tokenizer, args.seq_len, args.tokens // args.seq_len, start_id, sep_id)
    tokens = packed.tokens
    n_tok = tokens.size
    per_batch = max(1, args.batch_tokens // args.seq_len)
    print(f"model {lm.name}: {len(lm.adapter.layers)} layers, d_ffn {lm.adapter.d_ffn}; "
          f"{n_tok} tokens in {len(tokens)} sequences of {args.seq_len}; batches of {per_batch} sequences; "
          f"torch threads {torch.get_num_threads()}")

    out = Path(tempfile.mkdtemp()) / "bench.h5"
    config = RecordConfig(out=out, model=args.model, tokens=n_tok, seq_len=args.seq_len,
                          batch_tokens=args.batch_tokens, shard_tokens=args.shard_tokens, device="cpu",
                          calib_tokens=args.seq_len * per_batch)
    meta = build_meta(config, lm, sources, packed, args.seq_len, start_id, sep_id)
    # warm-up: JIT-compile the CPU kernels and touch the weights once, outside every timing
    from ffnscope.engine.record.stats import cpu_kernels

    if cpu_kernels is not None:
        g = np.zeros((args.seq_len, 64), np.float32)
        cpu_kernels.batch_stats(g, g, np.zeros(1, np.float32), 0, args.seq_len, np.zeros((1, 64), np.int64),
                                np.zeros(64), np.zeros(64), np.zeros(64, np.float32),
                                np.zeros((args.seq_len, 64), np.int64), np.zeros((1, 64), np.float32),
                                np.zeros((1, 64), np.int64), np.zeros((1, 64), np.float32), np.zeros(64, np.int64))
    bare_forward(lm, tokens[:per_batch], per_batch)  # first touch of the batch buffers

    # bare forward and recording alternate, --repeat times: this machine's speed drifts by 10-25 %
    # between minutes, so each recording is compared with the bare passes right around it
    bares, recs = [bare_forward(lm, tokens, per_batch)], []
    for _ in range(args.repeat):
        calib, rec, recorder = run_recording(config, lm, meta, tokens, packed.domains, len(lm.adapter.layers))
        recs.append(rec)
        bares.append(bare_forward(lm, tokens, per_batch))
    ratios = [(bares[i] + bares[i + 1]) / 2 / recs[i] for i in range(len(recs))]
    rec_s = None
    if not args.skip_streaming:
        layers = list(lm.adapter.layers)
        fixed = param_bytes(lm.adapter.base) - sum(param_bytes(layer) for layer in layers)
        budget = fixed + args.budget_layers * max(param_bytes(layer) for layer in layers)
        resident = plan_device(budget, lm, torch.device("cpu"), args.batch_tokens)
        config_s = RecordConfig(**{**config.__dict__, "out": out.with_name("stream.h5")})
        _, rec_s, rec_obj = run_recording(config_s, lm, meta, tokens, packed.domains, resident)
    bare = float(np.median(bares))
    print(f"bare forward        {n_tok / bare:9.1f} tok/s  (median of {', '.join(f'{b:.1f}' for b in bares)} s)")
    print(f"recording           {n_tok / float(np.median(recs)):9.1f} tok/s  "
          f"(runs {', '.join(f'{r:.1f}' for r in recs)} s)")
    print(f"  ratio to the bare passes around each run: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {float(np.median(ratios)):.3f}")
    print(f"  statistics        {recorder.seconds['statistics']:.1f} s; checkpoints {recorder.seconds['checkpoints']:.1f} s; "
          f"without checkpoints: ratio {bare / (rec - recorder.seconds['checkpoints']):.3f}")
    print(f"  calibration pass  {calib:.1f} s on {config.calib_tokens} tokens "
          f"(once per recording: {calib / 1e6 * 100 / (rec / n_tok):.2f}% of a 1M-token recording)")
    print(f"  cache size        {out.stat().st_size / 2**20:.1f} MiB")

    if rec_s is None:
        return
    print(f"streaming (budget {args.budget_layers} layers: {resident} resident, the rest stream): "
          f"{n_tok / rec_s:9.1f} tok/s; ratio to all-resident {rec / rec_s:.3f}")
    print(f"  process CPU s: all-resident {recorder.cpu_s:.1f} (wall {rec:.1f}), streaming {rec_obj.cpu_s:.1f} "
          f"(wall {rec_s:.1f}); ratio by CPU time {recorder.cpu_s / rec_obj.cpu_s:.3f}")
    n_batches = 2
    offload = accelerate_offload_bytes(lm, tokens, per_batch, n_batches) / (n_batches * per_batch * args.seq_len)
    ours = rec_obj.runner.bytes_moved / n_tok
    shard = min(args.shard_tokens, n_tok)
    print(f"weight bytes moved per token: layer-major streaming {ours:,.0f} (one copy of the streamed "
          f"layers per shard of {shard} tokens); accelerate cpu_offload {offload:,.0f} (every weight per "
          f"batch of {args.batch_tokens} tokens); ratio {offload / max(ours, 1e-9):.1f}x")


if __name__ == "__main__":
    main()
