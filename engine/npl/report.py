"""NPL results as text: the paper's Table 1, the Fig. 4 grid and the functional-neuron table, from
stored result rows.
No torch: the CLI's `npl show` and the TUI read results without loading a model."""
from __future__ import annotations

import numpy as np

MAPPINGS = ("random", "zero", "identical", "npl")
FUNCTIONAL_KINDS = ("unigram", "bigram", "trigram", "hard", "easy", "pos_successive", "pos_oscillatory",
                    "pos_arbitrary", "random_tokens")


def heldout_line(info: dict | None, tokens: int | None = None) -> str:
    """"held-out: 16 sequences, 32,768 tokens, from <source>", printed with every NPL figure; `tokens`
    alone where an older sidecar or result has no heldout_info (engine.npl.inputs)."""
    if not isinstance(info, dict) or not isinstance(info.get("seqs"), int):
        return f"held-out: {tokens or 0:,} tokens (an older fit: their source was not recorded)"
    dropped = info.get("dropped") or 0
    return (f"held-out: {info['seqs']:,} sequences, {info.get('tokens', 0):,} tokens, from {info.get('source', '?')}"
            + (f"; {dropped} repeating recorded or fit text skipped" if dropped else ""))


def _fmt(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "inf" if value == float("inf") else "-"
    return f"{value:.2f}" if value < 1e5 else f"{value:.2e}"


def format_table1(rows: list[dict], original_ppl: float, n_chunks: int = 4) -> str:
    """Rows shaped like the paper's Table 1, the unmodified model's perplexity last."""
    chunk_numbers = sorted({r["chunk"] for r in rows}) or list(range(1, n_chunks + 1))
    head = f"{'Mapping':<10} {'Substitution':<13}" + "".join(f" {'Chunk ' + str(c):>10}" for c in chunk_numbers)
    lines = [head, "-" * len(head)]
    by = {(r["mapping"], r["chunk"]): r for r in rows}
    modes = ("complete", "partial", "explicit") if any("explicit" in r for r in rows) else ("complete", "partial")
    for kind in [m for m in MAPPINGS if any(r["mapping"] == m for r in rows)]:
        for mode in modes:
            label = ("Random" if kind == "random" else kind.capitalize() if kind != "npl" else "NPL")
            cells = "".join(f" {_fmt(by[(kind, c)][mode]) if (kind, c) in by else '-':>10}" for c in chunk_numbers)
            name = "Explicit only" if mode == "explicit" else mode.capitalize()
            lines.append(f"{label if mode == 'complete' else '':<10} {name:<13}{cells}")
    lines.append(f"{'Original':<10} {'-':<13}" + "".join(f" {_fmt(original_ppl):>10}" for _ in chunk_numbers))
    return "\n".join(lines)


def format_finegrained(rows: list[dict], original_ppl: float, mode: str = "complete") -> str:
    lines = [f"{'Chunk':>5} {'Ranked by':<9} {'Top 50%':<10} {'Bottom 50%':<10} {mode.capitalize():>10}"]
    for r in sorted(rows, key=lambda r: (r["chunk"], r["metric"] != "-", r["metric"], r["top"], r["bottom"])):
        lines.append(f"{r['chunk']:>5} {r['metric']:<9} {r['top']:<10} {r['bottom']:<10} {_fmt(r[mode]):>10}")
    lines.append(f"original perplexity: {_fmt(original_ppl)}")
    return "\n".join(lines)


def format_functional(rows: list[dict]) -> str:
    layers = sorted({r["layer"] for r in rows})
    by = {(r["layer"], r["kind"]): r for r in rows}
    short = {"unigram": "1-gram", "bigram": "2-gram", "trigram": "3-gram", "hard": "hard", "easy": "easy",
             "pos_successive": "pos-succ", "pos_oscillatory": "pos-osc", "pos_arbitrary": "pos-arb",
             "random_tokens": "rnd-tok"}
    head = f"{'layer':>5}" + "".join(f" {short[k]:>9}" for k in FUNCTIONAL_KINDS) + f" {'S_all':>9} {'S_rand':>9} {'bg%':>6}"
    lines = [head]
    for layer in layers:
        cells = "".join(f" {by[(layer, k)]['S']:>9.4g}" if by[(layer, k)]["S"] is not None else f" {'-':>9}"
                        for k in FUNCTIONAL_KINDS)
        first = by[(layer, FUNCTIONAL_KINDS[0])]
        lines.append(f"{layer:>5}{cells} {first['S_all']:>9.4g} {first['S_random']:>9.4g} "
                     f"{100 * first['background_frac']:>6.1f}")
    return "\n".join(lines)
