"""NPL on the default model (SmolLM2-135M): exact fit against the paper's Adagrad recipe, the
substitution perplexity table (paper Table 1), and substitution throughput, in one run.

    python bench/npl_fit.py [--fit-tokens 100000] [--seq-len 512] [--sub-tokens 4096] [--seeds 3]
                            [--pairs adjacent] [--device cpu] [--json out.json]

Data: the built-in corpus packed at --seq-len; the first --fit-tokens fit M_{j-1->j} for every layer
(or --pairs), the next --heldout-seqs sequences (none equal to a fit one) are held out, with the exact fit and
the Adagrad recipe in the same pass. Prints for each method the time its updates and solve took
(the shared forward pass timed apart) and the held-out metrics averaged over pairs, then the
perplexity table on --sub-tokens held-out tokens, then tokens/s of a whole forward pass (every layer
and the LM head) plain and with NPL substitution of chunk 2 (complete and partial losses).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ffnscope.engine.data.sources import open_sources
from ffnscope.engine.data.packing import pack  # noqa: E402
from ffnscope.engine.model.load import load_model  # noqa: E402
from ffnscope.engine.npl.fit import FitOptions, fit_maps  # noqa: E402
from ffnscope.engine.npl.inputs import FitPlan, Recording, split_fit_data  # noqa: E402
from ffnscope.engine.npl.layout import chunks, parse_pairs, substituted  # noqa: E402
from ffnscope.engine.npl.report import format_table1  # noqa: E402
from ffnscope.engine.npl.substitute import (Maps, Setting, forward_throughput, mapping_fn, run_settings,  # noqa: E402
                                   table1_rows, table1_settings)
from ffnscope.engine.data.packing import special_ids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--fit-tokens", type=int, default=100_000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--heldout-seqs", type=int, default=16)
    ap.add_argument("--pairs", default="adjacent")
    ap.add_argument("--method", default="both")
    ap.add_argument("--sub-tokens", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    t0 = time.perf_counter()
    lm = load_model(args.model, "float32")
    n_layers = len(lm.adapter.layers)
    print(f"model {lm.name}: {n_layers} layers, d_ffn {lm.adapter.d_ffn}; torch threads {torch.get_num_threads()}; "
          f"loaded in {time.perf_counter() - t0:.1f} s")

    n_fit = math.ceil(args.fit_tokens / args.seq_len)
    plan = FitPlan(n_fit, n_fit, n_fit + 2 * args.heldout_seqs, 0)  # no recording: held out past the fit
    start_id, sep_id = special_ids(lm.tokenizer)
    packed = pack(open_sources(["builtin"], seed=0).documents(), lm.tokenizer, args.seq_len, plan.n_pack, start_id,
                  sep_id)
    fit_tokens, heldout, _info = split_fit_data(packed.tokens, plan, Recording({}, np.zeros(0, np.uint64)),
                                                ["builtin"], args.heldout_seqs, print)
    print(f"data: {fit_tokens.size} fit tokens, {heldout.size} held-out tokens (seq_len {args.seq_len})")
    out["data"] = {"fit_tokens": int(fit_tokens.size), "heldout_tokens": int(heldout.size), "seq_len": args.seq_len}

    pairs = parse_pairs(args.pairs, n_layers)
    last = [time.time()]

    def progress(fields):
        if time.time() - last[0] > 60:
            last[0] = time.time()
            print(f"  {fields.get('phase')}: {fields.get('tokens_done')}/{fields.get('tokens_total')} tokens, "
                  f"{fields.get('tokens_per_s', 0):.0f} tokens/s", flush=True)

    t0 = time.perf_counter()
    result = fit_maps(lm, fit_tokens, heldout, pairs, FitOptions(method=args.method), args.device, progress)
    wall = time.perf_counter() - t0
    sec = result.seconds
    print(f"\nfit pass: {wall:.1f} s wall; shared forward {sec.get('forward', 0):.1f} s "
          f"({fit_tokens.size / max(sec.get('forward', 1e-9), 1e-9):.0f} tokens/s), "
          f"held-out pass {sec.get('heldout', 0):.1f} s")
    out["fit"] = {"wall_s": wall, "seconds": sec, "pairs": len(pairs), "methods": {}}
    for method, maps in result.maps.items():
        scal = [m.scalars for m in maps.values()]
        mean = {k: float(np.mean([s[k] for s in scal])) for k in ("token_l2", "mse", "fvu", "mean_pearson")}
        secs = sec.get(method, 0.0)
        solve = f" (solve {sec['exact_solve']:.1f} s)" if method == "exact" and "exact_solve" in sec else ""
        print(f"{method:8s}: fit time {secs:7.1f} s{solve} ({secs / len(pairs):.2f} s/pair); held-out mean over "
              f"{len(pairs)} "
              f"pairs: L2/token {mean['token_l2']:.4f}, MSE {mean['mse']:.5f}, unexplained variance {mean['fvu']:.4f}, "
              f"Pearson r {mean['mean_pearson']:.4f}")
        out["fit"]["methods"][method] = {"seconds": secs, **mean}
    if len(result.maps) == 2:
        ex, ad = result.maps["exact"], result.maps["adagrad"]
        better = sum(ex[p].scalars["token_l2"] <= ad[p].scalars["token_l2"] for p in pairs)
        print(f"exact no worse than Adagrad (held-out L2/token) on {better}/{len(pairs)} pairs; "
              f"exact/Adagrad time {sec['exact'] / max(sec['adagrad'], 1e-9):.2f}")
        out["fit"]["exact_no_worse_pairs"] = better
    ppl_held = float(np.exp(result.heldout_nll.astype(np.float64).mean()))
    print(f"held-out perplexity of the unmodified model: {ppl_held:.3f}")

    exact = result.maps.get("exact")
    if exact is None or not all((j - 1, j) in exact for j in range(1, n_layers)):
        print("no adjacent exact maps: skipping substitution")
    else:
        maps = Maps(lm.fingerprint, lm.adapter.d_ffn, {j: (exact[(j - 1, j)].W, exact[(j - 1, j)].b)
                                                       for j in range(1, n_layers)})
        sub = heldout[: max(1, args.sub_tokens // args.seq_len)]
        settings = table1_settings(n_layers, maps, [1, 2, 3, 4], seeds=args.seeds)
        t0 = time.perf_counter()
        run = run_settings(lm, sub, settings, args.device, on_progress=progress, maps=maps)
        rows = table1_rows(run)
        print(f"\nsubstitution perplexity on {sub.size} held-out tokens ({len(settings)} settings, "
              f"{time.perf_counter() - t0:.0f} s); chunks: "
              + ", ".join(f"{c[0]}-{c[-1]}" for c in chunks(n_layers)) + "; layer 0 kept actual")
        print(format_table1(rows, run.original_ppl))
        out["table1"] = {"original_ppl": run.original_ppl, "rows": rows, "tokens": int(sub.size)}

        probe = sub[: max(1, 2048 // args.seq_len)]
        forward_throughput(lm, probe[:1], None, args.device)  # warm-up
        plain = forward_throughput(lm, probe, None, args.device)
        npl = Setting(substituted(chunks(n_layers)[1]), mapping_fn("npl", maps), {})
        with_npl = forward_throughput(lm, probe, npl, args.device)
        print(f"\nwhole forward on {probe.size} tokens: plain {plain:.0f} tokens/s; with NPL substitution of chunk 2 "
              f"(complete + partial loss) {with_npl:.0f} tokens/s ({with_npl / plain:.2f}x)")
        out["throughput"] = {"plain_tokens_per_s": plain, "npl_chunk2_tokens_per_s": with_npl}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
