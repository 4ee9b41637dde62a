"""NPL results as Rich Text, for `ffnscope npl show` and the TUI's NPL screen: the fit summary with
the paper's averages, the layer-pair grid as a terminal heatmap, Table 1 and functional neurons."""
from __future__ import annotations

import math

from rich.text import Text

from ffnscope.app.safe_text import printable
from ffnscope.engine.npl.overview import NplOverview
from ffnscope.engine.npl.report import format_finegrained, format_functional, format_table1, heldout_line

SHADES = " ░▒▓█"
# how to get what is missing, in the words of the CLI (the TUI passes its keys)
CLI_HINTS = {"fit": "`ffnscope npl fit FILE` fits them", "substitute": "`ffnscope npl substitute FILE` runs it",
             "functional": "`ffnscope npl functional FILE` finds them"}
KEY_WORDS = {"token_l2": "L2 distance per token", "mse": "mean squared error", "fvu": "variance unexplained",
             "mean_pearson": "mean Pearson r"}


def fit_text(o: NplOverview, hints: dict = CLI_HINTS) -> Text:
    out = Text()
    if o.error:
        out.append(printable(o.error), style="red")
        return out
    if not o.exists:
        out.append(f"no NPL maps yet: {hints['fit']}")
        return out
    fit = o.meta.get("fit", {})
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in fit.get("seconds", {}).items())
    out.append("maps ", style="bold")
    out.append(f"{sum(len(p) for p in o.pairs.values())} ({', '.join(o.pairs)}) on {fit.get('fit_tokens', 0):,} fit "
               f"tokens{'; ' + seconds if seconds else ''}\n")
    out.append(printable(heldout_line(fit.get("heldout"), fit.get("heldout_tokens"))) + "\n")
    for method, by_key in o.summary.items():
        for key in ("token_l2", "mean_pearson"):
            groups = by_key.get(key, {})
            cells = " · ".join(f"{name.replace('_', '-')} {value:.4g}" for name, value in groups.items()
                               if value is not None)
            if cells:
                out.append(f"{method} {KEY_WORDS[key]}: ", style="bold")
                out.append(cells + "\n")
    return out


def heatmap(o: NplOverview, method: str, key: str = "token_l2") -> Text:
    """Rows: source layer i, columns: target layer j; darker is larger. One cell per layer pair."""
    pairs = o.pairs.get(method, {})
    values = {p: s.get(key) for p, s in pairs.items() if s.get(key) is not None and math.isfinite(s.get(key))}
    out = Text()
    if not values:
        out.append(f"no {method} maps to draw")
        return out
    sources = sorted({i for i, _ in values})
    targets = sorted({j for _, j in values})
    lo, hi = min(values.values()), max(values.values())
    out.append(f"{KEY_WORDS.get(key, key)} of M_i->j ({method}), rows i, columns j\n", style="bold")
    out.append(f"'{SHADES[1]}' {lo:.3g} .. '{SHADES[-1]}' {hi:.3g}, '·' not fitted\n")
    out.append("     " + column_labels(targets) + "\n", style="dim")
    for i in sources:
        out.append(f"{i:>4} ", style="dim")
        for j in targets:
            value = values.get((i, j))
            if value is None:
                out.append(" ·", style="dim")
            else:
                level = 1 + int((len(SHADES) - 2) * (value - lo) / (hi - lo)) if hi > lo else 1
                out.append(SHADES[level] * 2)
        out.append("\n")
    return out


def column_labels(targets: list[int]) -> str:
    """Labels over the heatmap's two-cell columns that never run together: every column while they
    all have one digit, else every other one (in four cells)."""
    if max(targets) < 10:
        return "".join(f"{j:>2}" for j in targets)
    return "".join(f"{j:<4}" if j >= 100 else f"{j:>2}  " for j in targets[::2]).rstrip()


def results_text(o: NplOverview, hints: dict = CLI_HINTS) -> Text:
    out = Text()
    subst = o.results.get("substitution")
    if subst:
        params = subst["params"]
        out.append(f"substitution perplexity (Table 1); layer 0 {printable(str(params.get('layer0', '')))}\n",
                   style="bold")
        out.append(printable(heldout_line(params.get("heldout"), params.get("heldout_tokens"))) + "\n")
        out.append(format_table1(subst["rows"], params.get("original_ppl", float("nan"))) + "\n")
        rates = params.get("tokens_per_s", {})
        if rates:
            out.append(f"tokens/s: plain {rates.get('plain', 0):,.0f}, with substitution "
                       f"{rates.get('substitution', 0):,.0f}\n")
    else:
        out.append(f"no substitution results (Table 1) yet: {hints['substitute']}\n")
    fine = o.results.get("finegrained")
    if fine:
        out.append("\nfiner-grained substitution (Fig. 4)\n", style="bold")
        out.append(format_finegrained(fine["rows"], fine["params"].get("original_ppl", float("nan"))) + "\n")
    functional = o.results.get("functional")
    if functional:
        out.append("\nfunctional neurons: mean predictability S by property (all, random), bg %\n",
                   style="bold")
        out.append(format_functional(functional["rows"]) + "\n")
        params = functional.get("params", {})
        out.append(printable(heldout_line(params.get("heldout"), params.get("heldout_tokens"))) + "\n")
    else:
        out.append(f"\nno functional / background neurons yet: {hints['functional']}\n")
    return out
