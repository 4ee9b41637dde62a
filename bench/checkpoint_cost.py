"""What checkpoints cost against the compute, shard by shard and amortized (issues 11 and 18).

    python bench/checkpoint_cost.py [--layers 8] [--d-model 512] [--d-ffn 4096] [--seq-len 128]
        [--shard-tokens 1024] [--shards 16] [--checkpoint-ratio R] [--whole]

A random Llama built in code (tests.tiny_models' tokenizer) is recorded on CPU with many small shards;
per shard it prints the seconds of compute, of what followed it before the next shard (the shard's
segment, and the checkpoint of the fixed-size statistics where one was written: Recorder.shard_seconds,
Recorder.checkpointed), their ratio, and the amortized ratio (all checkpoint time over all compute).
Goal: <= 0.05 and flat. --whole: checkpoints write pos_fire whole, as before issue 18 (a comparison).
Issue 18's shape, fixed arrays over 1 GB (pos_fire alone 4 x 2048 x 32768 x 4 bytes), one sequence a shard:

    python bench/checkpoint_cost.py --layers 4 --d-model 256 --d-ffn 32768 --seq-len 2048 \
        --shard-tokens 16384 --batch-tokens 4096 --shards 8 --samples 64
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from ffnscope.cache import schema  # noqa: E402
from ffnscope.engine.record import executor  # noqa: E402
from ffnscope.engine.record.config import RecordConfig  # noqa: E402
from ffnscope.engine.record.job import record  # noqa: E402
from tests.tiny_tokenizer import make_tokenizer  # noqa: E402
from tests.tiny_models import BOS, EOS, PAD, VOCAB  # noqa: E402


def model_dir(directory: Path, layers: int, d_model: int, d_ffn: int, seq_len: int) -> Path:
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=d_model, intermediate_size=d_ffn, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq_len,
                            vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    tf.AutoModelForCausalLM.from_config(config).eval().save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def text_file(path: Path, n_words: int) -> Path:
    words = ("the cat sat on a mat by the bank of a big blue river and all was fine before breakfast "
             "but after lunch a storm came over the hills").split()
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ffn", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-tokens", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, help="default: a shard's tokens")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--checkpoint-ratio", type=float, default=executor.Recorder.CHECKPOINT_RATIO,
                        help="Recorder.CHECKPOINT_RATIO; 0: a checkpoint after every shard (the old cadence)")
    parser.add_argument("--whole", action="store_true", help="checkpoints write pos_fire whole (before issue 18)")
    args = parser.parse_args()
    executor.Recorder.CHECKPOINT_RATIO = args.checkpoint_ratio
    if args.whole:
        write_state = executor.write_state
        executor.write_state = lambda *a, increments=None, **k: write_state(*a, **k)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = model_dir(tmp / "model", args.layers, args.d_model, args.d_ffn, args.seq_len)
        tokens = args.shards * args.shard_tokens
        data = text_file(tmp / "text.txt", tokens)  # about 4 bytes a word: more than enough tokens
        out = tmp / "cache.h5"
        config = RecordConfig(out=out, model=str(model), data=[str(data)], tokens=tokens, seq_len=args.seq_len,
                              shard_tokens=args.shard_tokens, batch_tokens=args.batch_tokens or args.shard_tokens,
                              samples=args.samples, device="cpu", calib_tokens=args.shard_tokens)
        recorders = []
        original_init = executor.Recorder.__init__

        def init(self, *a, **k):
            original_init(self, *a, **k)
            recorders.append(self)
        executor.Recorder.__init__ = init
        t0 = time.perf_counter()
        state = record(config, log=lambda *_: None)
        total = time.perf_counter() - t0
        log = recorders[0].shard_seconds
        written = set(getattr(recorders[0], "checkpointed", range(1, len(log) + 1)))  # older: every shard
        size = out.stat().st_size
    fixed = sum(getattr(layer, name).nbytes for layer in state.layers.values() for name in schema.LAYER_ARRAYS)
    print(f"{args.layers} layers x {args.d_ffn} neurons, d_model {args.d_model}, seq_len {args.seq_len}, "
          f"{len(log)} shards of {args.shard_tokens} tokens, {args.samples} samples, "
          f"checkpoint ratio {args.checkpoint_ratio:g}, fixed-size arrays {fixed / 2**30:.2f} GiB, "
          f"pos_fire {'whole' if args.whole else 'as its increment'} in checkpoints")
    print("shard  compute_s  checkpoint_s  ratio  full")
    ratios = []
    for shard, (compute, checkpoint) in enumerate(log, 1):
        ratios.append(checkpoint / compute)
        full = "yes" if shard in written else "-"
        print(f"{shard:5d}  {compute:9.3f}  {checkpoint:12.3f}  {ratios[-1]:5.3f}  {full}")
    amortized = sum(c for _, c in log) / sum(c for c, _ in log)
    print(f"ratio first {ratios[0]:.3f}, last {ratios[-1]:.3f}, max {max(ratios):.3f}, amortized {amortized:.3f}; "
          f"{len(written)} checkpoints; whole job {total:.1f} s; final cache {size / 2**20:.1f} MiB")

if __name__ == "__main__":
    main()
