"""Peak host memory of an NPL fit with many pairs in several groups: every map kept in memory to the end
(before: engine.npl.maps.KeptMaps, what FitResult held until 2026-11) against each group's maps written to
the sidecar as the group ends (after: cache.npl_store.NplWriter, what `ffnscope npl fit` does now).
Then of a substitution (the npl mapping, chunks 1-4) on the maps that fit wrote: every map read up front
(before) against one chunk's maps held at a time (after: Maps.from_reader, what `npl substitute` does now).

    python bench/npl_memory.py [--d-ffn 2048] [--layers 13] [--group 2] [--seqs 24] [--json out.json]

A random Llama-shaped model with a wide FFN (d_model 64: the forward is cheap, the maps are not) is saved
once to a temporary directory; each mode runs in its own process with the same pairs (adjacent) and the
same groups, and reports its peak RSS (ru_maxrss) beside its RSS before the fit. The difference between
the modes is the maps: d_ffn^2 float64 per pair, all of them before, one group's after; in substitution
d_ffn^2 float32 per layer, all of them before, one chunk's after.
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


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, model: str, group: int, seqs: int, out: str) -> None:
    import numpy as np

    from ffnscope.cache.npl_store import NplWriter, map_bytes
    from ffnscope.engine.model.load import load_model
    from ffnscope.engine.npl.fit import FitOptions, fit_maps

    lm = load_model(model)
    n = len(lm.adapter.layers)
    if mode.startswith("subst"):
        substitute(mode, lm, n, seqs, out)
        return
    pairs = [(j - 1, j) for j in range(1, n)]
    groups = [pairs[k:k + group] for k in range(0, len(pairs), group)]
    tokens = np.random.default_rng(0).integers(0, 256, size=(seqs, 64)).astype(np.int32)
    fit, held = tokens[: seqs - 4], tokens[seqs - 4:]
    options = FitOptions(stats_dtype="float32", batch_tokens=8 * 64)
    before = _rss_mb()
    t0 = time.perf_counter()
    if mode == "kept":
        fit_maps(lm, fit, held, pairs, options, groups=groups)
    else:
        with NplWriter(Path(out), needs=map_bytes(len(pairs), lm.adapter.d_ffn)) as writer:
            result = fit_maps(lm, fit, held, pairs, options, groups=groups, sink=writer)
            writer.finish({}, np.zeros(0, np.uint64), np.zeros(0, np.uint64), held, result.heldout_nll)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "rss_before_fit_mb": before, "peak_rss_mb": peak, "pairs": len(pairs),
                      "groups": len(groups), "seconds": time.perf_counter() - t0}))


def substitute(mode: str, lm, n: int, seqs: int, out: str) -> None:
    import numpy as np

    from ffnscope.cache.npl_store import NplReader
    from ffnscope.engine.npl.substitute import Maps, run_settings, table1_settings

    tokens = np.random.default_rng(1).integers(0, 256, size=(max(1, seqs // 4), 64)).astype(np.int32)
    with NplReader(Path(out)) as reader:
        layers = range(1, n)
        before = _rss_mb()
        t0 = time.perf_counter()
        if mode == "subst-whole":
            maps = Maps(lm.fingerprint, lm.adapter.d_ffn, {j: reader.load_map(j - 1, j) for j in layers})
        else:
            maps = Maps(lm.fingerprint, lm.adapter.d_ffn, load=lambda j: reader.load_map(j - 1, j), layers=layers)
        settings = table1_settings(n, maps, [1, 2, 3, 4], mappings=("npl",))
        run = run_settings(lm, tokens, settings, batch_tokens=8 * 64, maps=maps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "rss_before_fit_mb": before, "peak_rss_mb": peak, "pairs": n - 1,
                      "groups": len(settings), "seconds": time.perf_counter() - t0,
                      "ppl": [o.ppl("complete") for o in run.outcomes]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--group", type=int, default=2, help="pairs per group")
    ap.add_argument("--seqs", type=int, default=24, help="sequences of 64 tokens (4 held out)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.group, args.seqs, args.child[2])
        return
    import torch
    import transformers as tf

    from tests.tiny_models import save

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=args.d_ffn, num_hidden_layers=args.layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
        model = save(tf.AutoModelForCausalLM.from_config(config).eval(), Path(tmp) / "model")
        rows = []
        for mode in ("kept", "sidecar", "subst-whole", "subst-held"):  # the substitutions read the sidecar's maps
            run = subprocess.run([sys.executable, __file__, "--group", str(args.group), "--seqs", str(args.seqs),
                                  "--child", mode, str(model), str(Path(tmp) / "c.npl.h5")],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            what = "chunks" if mode.startswith("subst") else "groups"
            print(f"{mode:11s} {r['pairs']} pairs in {r['groups']} {what}, d_ffn {args.d_ffn}: peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB (before {r['rss_before_fit_mb']:.0f} MB), {r['seconds']:.1f} s")
        maps_mb = 8 * args.d_ffn ** 2 * rows[0]["pairs"] / 2 ** 20
        print(f"fit: every pair's float64 maps: {maps_mb:.0f} MB; peak saved: "
              f"{rows[0]['peak_rss_mb'] - rows[1]['peak_rss_mb']:.0f} MB")
        assert rows[2]["ppl"] == rows[3]["ppl"], "substitution holding one chunk's maps changed a perplexity"
        print(f"substitution: every layer's float32 maps: {maps_mb / 2:.0f} MB; peak saved: "
              f"{rows[2]['peak_rss_mb'] - rows[3]['peak_rss_mb']:.0f} MB; perplexities equal")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
