"""Recording a Llama-7B-shaped model on one GPU: all layers resident, and streamed under a device budget
of 4 layers, against a bare forward pass of the same tokens. One run, under 8 minutes on an H200.

    python bench/gpu_scale.py [--tokens 65536] [--tiny]

Writes a random fp16 Llama (32 layers, d_model 4096, d_ffn 11008; the vocabulary is the test tokenizer's
259 bytes, so embeddings and head are small) as safetensors, one shard per layer, written a layer at a
time like bench/scale_sim.py, in a temp dir. Then three child processes on the same packed tokens:
(a) `record` with every layer resident, (b) `record --device-memory` of 4 layers (on a GPU 2 resident and
two streaming slots: the next layer is prefetched on a side stream while the current one computes; on the
CPU 3 resident and one slot), and a bare forward pass of the base model (no LM head, every layer on the
device). Prints for each: tokens/s (the recording's shards, checkpoints included; load and calibration
excluded) and its ratio to bare forward, and (b)'s ratio to (a); weight bytes moved per token (the
recording's meta weight_bytes_moved, and the shards' own share); hidden-state bytes moved per token
between host and device (counted by the executor: 0 when the plan keeps a shard's hidden states on the
GPU, else about 2 x d_model x bytes x layers over pinned double buffers on a copy stream); the plan's
resident layers and whether it found room for the hidden states on the device; peak GPU memory
(torch.cuda.max_memory_allocated in the child) and peak host RSS (wait4's rusage of the child).

--tiny runs the same code on the CPU with an 8-layer model of d_model 128 in well under a minute (the
device budget is still 4 layers, so (b) streams; the CUDA-only paths, pinned buffers, copy streams and
events, need a GPU). TMPDIR chooses where the model is written (13.5 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ffnscope.engine.units import human  # noqa: E402
from tests.fixtures.random_llama import layer_params, write_random_llama  # noqa: E402
from tests.tiny_models import VOCAB  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=32)
TINY = dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
            num_hidden_layers=8)
RUN_7B = dict(device="cuda", seq_len=2048, batch_tokens=8192, shard_tokens=32768, calib_tokens=8192)
RUN_TINY = dict(device="cpu", seq_len=64, batch_tokens=256, shard_tokens=512, calib_tokens=256)
DTYPE, ITEMSIZE = "float16", 2
CHILD_LIMIT_S, TOTAL_LIMIT_S = 160, 460  # a child is killed past either: the whole run stays under 8 minutes


def write_model(directory: Path, shape: dict) -> tuple[int, int, int]:
    """A random fp16 Llama (generated on the GPU when there is one);
    -> (bytes of weights, of one layer, of the base's non-layer weights)."""
    where = "cuda" if torch.cuda.is_available() else "cpu"
    total = write_random_llama(directory, {**shape, "max_position_embeddings": 2048, "tie_word_embeddings": False},
                               torch.float16, where)
    base = (VOCAB * shape["hidden_size"] + shape["hidden_size"]) * ITEMSIZE  # embeddings and final norm
    return total, layer_params(shape) * ITEMSIZE, base


# --- the children ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_record(spec: dict) -> dict:
    from ffnscope.engine.record import executor, job
    from ffnscope.engine.record.config import RecordConfig

    device = torch.device(spec["device"])
    timed = {"seconds": 0.0, "tokens": 0, "moved": 0, "hidden_moved": 0}
    real_shards, real_plan = executor.Recorder.record_shards, job.plan_memory

    def record_shards(self, state, tokens, lo):  # the shards alone: no load, no calibration
        _sync(device)
        start, moved, hidden = time.perf_counter(), self.runner.bytes_moved, self.blocks.hidden_bytes_moved
        try:
            return real_shards(self, state, tokens, lo)
        finally:
            _sync(device)
            timed["seconds"] += time.perf_counter() - start
            timed["moved"] += self.runner.bytes_moved - moved
            timed["hidden_moved"] += self.blocks.hidden_bytes_moved - hidden
            timed["tokens"] += int(tokens.size)

    def plan_memory(*args, **kwargs):
        memory = real_plan(*args, **kwargs)
        timed["hidden_on_device"] = bool(getattr(memory, "hidden_on_device", False))
        return memory

    executor.Recorder.record_shards, job.plan_memory = record_shards, plan_memory
    config = RecordConfig(out=Path(spec["out"]), model=spec["model"], tokens=spec["tokens"], seq_len=spec["seq_len"],
                          dtype=DTYPE, device=spec["device"], batch_tokens=spec["batch_tokens"],
                          shard_tokens=spec["shard_tokens"], calib_tokens=spec["calib_tokens"],
                          device_memory=spec["device_memory"], force=True)
    state = job.record(config, log=lambda *_: None)
    rec = state.meta["recording"]
    return {**timed, "resident": rec["resident_layers"], "meta_moved": rec["weight_bytes_moved"],
            "recorded": rec["part_tokens"], "hidden_on_disk": rec["hidden_on_disk"]}


def child_bare(spec: dict) -> dict:
    import numpy as np

    from ffnscope.engine.data.packing import pack, special_ids
    from ffnscope.engine.data.sources import open_sources
    from ffnscope.engine.model.load import load_model
    from ffnscope.engine.model.runner import LayerRunner

    device = torch.device(spec["device"])
    lm = load_model(spec["model"], DTYPE)
    LayerRunner(lm.adapter, device, len(lm.adapter.layers))  # every layer read onto the device, as (a)
    seq_len = spec["seq_len"]
    start_id, sep_id = special_ids(lm.tokenizer)  # the tokens `record` packs from the same settings
    packed = pack(open_sources(["builtin"]).documents(), lm.tokenizer, seq_len, spec["tokens"] // seq_len,
                  start_id, sep_id)
    ids = torch.as_tensor(packed.tokens.astype(np.int64))
    per_batch = max(1, spec["batch_tokens"] // seq_len)
    with torch.inference_mode():
        lm.adapter.base(input_ids=ids[:per_batch].to(device), use_cache=False)  # warm-up, untimed
        _sync(device)
        start = time.perf_counter()
        for lo in range(0, len(ids), per_batch):
            lm.adapter.base(input_ids=ids[lo:lo + per_batch].to(device), use_cache=False)
        _sync(device)
    return {"seconds": time.perf_counter() - start, "tokens": int(ids.numel()), "resident": len(lm.adapter.layers)}


def run_child(spec: dict, work: Path, started: float) -> dict:
    """Runs one child under the limits; -> its result with peak host RSS (wait4), or an error."""
    result_file = work / f"{spec['name']}.json"
    spec = {**spec, "result": str(result_file)}
    with open(work / f"{spec['name']}.log", "w+") as log:
        child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
        deadline = min(time.perf_counter() + CHILD_LIMIT_S, started + TOTAL_LIMIT_S)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.send_signal(signal.SIGKILL)
            time.sleep(0.2)
        log.seek(0)
        tail = log.read()[-800:]
    if os.waitstatus_to_exitcode(status) != 0 or not result_file.is_file():
        return {"error": f"exit {os.waitstatus_to_exitcode(status)}: {tail.strip().splitlines()[-1:] or ''}"}
    return {**json.loads(result_file.read_text()), "rss": usage.ru_maxrss * 1024}


def child_main(spec: dict) -> None:
    device = torch.device(spec["device"])
    result = child_bare(spec) if spec["mode"] == "bare" else child_record(spec)
    result["gpu_peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    Path(spec["result"]).write_text(json.dumps(result))


# --- the parent ------------------------------------------------------------------------------------
def report(name: str, r: dict, bare: dict | None) -> str:
    if "error" in r:
        return f"{name:16} failed: {r['error']}"
    rate = r["tokens"] / r["seconds"]
    ratio = f"{rate / (bare['tokens'] / bare['seconds']):6.3f}" if bare and "error" not in bare else "     -"
    hidden = round(r["hidden_moved"] / r["tokens"]) if "recorded" in r else 0
    weights = (f"{r['meta_moved'] / r['recorded']:>12,.0f} ({r['moved'] / r['tokens']:>10,.0f})"
               if "recorded" in r else f"{0:>12} {'':12}")
    plan = (f"{r['resident']:>3} {'yes' if r.get('hidden_on_device') else 'no':>4} "
            f"{'yes' if r.get('hidden_on_disk') else 'no':>4}") if "recorded" in r else f"{r['resident']:>3}    -    -"
    gpu = human(r["gpu_peak"]) if r.get("gpu_peak") is not None else "-"
    return (f"{name:16} {rate:10,.1f} {ratio} {weights} {hidden:>12,} {plan} {gpu:>10} {human(r['rss']):>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="tokens recorded (default 65536; --tiny 1024)")
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU, same code path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    shape, settings = (TINY, RUN_TINY) if args.tiny else (LLAMA_7B, RUN_7B)
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --tiny for the CPU run")
    tokens = args.tokens or (1024 if args.tiny else 65536)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ffnscope-gpu-scale-"))
    try:
        model = work / "model"
        total, per_layer, base = write_model(model, shape)
        print(f"model: random Llama, {shape['num_hidden_layers']} layers, d_model {shape['hidden_size']}, "
              f"d_ffn {shape['intermediate_size']}, {DTYPE}: weights {human(total)} ({human(per_layer)} a layer), "
              f"written in {time.perf_counter() - started:.0f}s", flush=True)
        common = {**settings, "model": str(model), "tokens": tokens}
        four = base + 4 * per_layer + per_layer // 2  # 4 layers' room: resident ones and the streaming slot(s)
        runs = [("bare forward", {"mode": "bare"}),
                ("all resident", {"mode": "record", "device_memory": None}),
                ("4-layer budget", {"mode": "record", "device_memory": four})]
        results = {}
        for name, extra in runs:
            spec = {**common, **extra, "name": name.replace(" ", "-"), "out": str(work / f"{name[:3]}.h5")}
            results[name] = run_child(spec, work, started)
            print(f"  {name}: done at {time.perf_counter() - started:.0f}s", flush=True)
        bare = results["bare forward"]
        print(f"{tokens} tokens, seq_len {settings['seq_len']}, batches of {settings['batch_tokens']}, shards of "
              f"{settings['shard_tokens']}, on {settings['device']}; --device-memory {human(four)} for (b)")
        print(f"{'':16} {'tokens/s':>10} {'ratio':>6} {'weight B/tok (shards)':>25} {'hidden B/tok':>12} "
              f"res  hid disk {'peak GPU':>10} {'peak RSS':>10}")
        for name, _ in runs:
            print(report(name, results[name], bare))
        a, b = results["all resident"], results["4-layer budget"]
        if "error" not in a and "error" not in b:
            print(f"4-layer budget / all resident: {(b['tokens'] / b['seconds']) / (a['tokens'] / a['seconds']):.3f} "
                  "(goal >= 0.9; all resident / bare forward: goal >= 0.9)")
        print("ratio: to bare forward; weight B/tok: meta weight_bytes_moved / tokens recorded (calibration "
              "included), in brackets the shards' own; hidden B/tok: host<->device bytes of the shards' hidden "
              "states (counted); "
              "res: resident layers; hid: the plan found room for the hidden states on the device; disk: "
              f"hidden states spilled to a file. Total {time.perf_counter() - started:.0f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
