"""Split-half reproducibility of the analyses: how many token detectors, positional neurons and
suppressing detectors found on one half of the data are found again on the other, per firing rule.

    python bench/reproducibility.py [--model default] [--data builtin ...] [--tokens 1048576]
        [--seed S] [--rules "--tau 1" "--tau 0" "--tau-rule quantile:0.99" ...]
        [--criteria "" "positional.null_quantile=0.9999" ...] [--out-dir DIR] [--layers 0-5]
        [--shard-tokens N] [--batch-tokens N] [--device D] [--record-args "..."] [--min-count 20]
        [--force]

The halves are the two parts of one packed data set (`record --part 1/2` and `--part 2/2`, same
--tokens, --seed and --data: disjoint contiguous halves of the seed-shuffled sequences). Each rule is
a string of `record` arguments (see `ffnscope record --help`: `--tau T`, `--tau-rule quantile:Q`,
`--tau-rule median-max:F`, ...); each criterion a string of `analyze --set` assignments (the empty
string: the defaults), for choosing the positional criterion. Both halves of every rule are
recorded into --out-dir (a cache whose name encodes its settings is reused, so a second run only
re-analyses; a partial one is resumed), analysed with each criterion, and compared by the engine's
split-half comparison (engine.explore.reproduce, what `ffnscope reproduce A B` prints: the neuron
table that exports read; dead fractions per recorded threshold come from the cache's fire counts).

Per rule and criterion it prints, per layer group (all recorded layers; those in the model's first
half; its second half) and per category of `ffnscope reproduce` (dead at the rule and at tau 0,
token / bigram / trigram detectors, suppression in both readings, positional neurons): the count in
A, in B, found again (the same layer and neuron; a detector with the same triggers), reproducibility
|A&B|/|A|, the Jaccard index |A&B|/|A or B|, and how many detectors have other triggers, how many
positional neurons found again have the same type, on how many detectors of both halves the
suppression verdict agrees; then dead neurons per recorded threshold in both halves (fractions,
and how many dead in A are dead in B). A summary
table has one row per rule. The last line is the recommendation: the rule whose findings reproduce
best, pooled over token detectors, positional neurons and suppressing detectors (the raw-logit
reading) and so weighted by their counts (sum |A&B| / sum (|A|+|B|)/2,
under the first criterion), and with several criteria the positional criterion whose positional
neurons reproduce best under that rule; or that the counts (< --min-count) are too small to decide.
The caches keep the analyses of the last criterion.

Recording 1M tokens of all 30 layers of SmolLM2-135M takes hours on a laptop CPU; run it once, not
in CI.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ffnscope.cache.errors import UserError  # noqa: E402
from ffnscope.cache.schema import COMPLETE  # noqa: E402
from ffnscope.engine.explore.reproduce import Category, reproduce  # noqa: E402  (no torch)
from ffnscope.engine.jobs import launcher as jobs  # noqa: E402  (light: no torch)

CLI = [sys.executable, "-m", "ffnscope"]
# the findings pooled for the recommendation (engine.explore.reproduce.CATEGORIES): token detectors,
# positional neurons and token detectors whose update suppresses their triggers (the paper's reading)
MAIN = ("token_detector", "positional", "suppresses_logit")


# --- arguments ------------------------------------------------------------------------------------
def split_list_options(argv: list[str], names: tuple[str, ...], known: set[str]) -> tuple[list[str], dict]:
    """Take `--rules A B ...` out of argv by hand: a rule is a string of record options ("--tau 1",
    "--tau-rule=quantile:0.99"), which argparse would read as an option of its own. The list runs
    until the next option of this script."""
    rest, lists = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in names:
            items = [value] if eq else []
            i += 1
            while i < len(argv) and argv[i].partition("=")[0] not in known:
                items.append(argv[i])
                i += 1
            lists[name] = items
            continue
        rest.append(arg)
        i += 1
    return rest, lists


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/reproducibility.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--rules and --criteria take the rest of the arguments up to this script's next option; "
               "quote each rule: --rules \"--tau 1\" \"--tau 0\" \"--tau-rule quantile:0.99\"")
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", nargs="+", default=["builtin"])
    parser.add_argument("--tokens", type=int, default=1_048_576, help="tokens of both halves together")
    parser.add_argument("--seed", type=int, help="record's --seed (default: record's own)")
    parser.add_argument("--rules", metavar="RULE", nargs="+", help="firing rules to compare, each a string of record "
                        "arguments (default: \"--tau 1\" \"--tau 0\")")
    parser.add_argument("--criteria", metavar="SETS", nargs="+", help="analysis settings to compare, each a string of "
                        "`analyze --set` assignments like \"positional.null_quantile=0.9999\" (default: \"\", "
                        "the defaults)")
    parser.add_argument("--out-dir", type=Path, default=Path.home() / ".cache" / "ffnscope" / "repro")
    parser.add_argument("--layers", help="record's --layers, like 0-5")
    parser.add_argument("--shard-tokens", type=int)
    parser.add_argument("--batch-tokens", type=int)
    parser.add_argument("--device", help="record's --device")
    parser.add_argument("--record-args", default="", help="more record arguments for every recording, "
                        "like \"--seq-len 1024 --dtype bfloat16\" (part of the cache name)")
    parser.add_argument("--min-count", type=int, default=20,
                        help="fewest findings (mean of A and B, pooled) for a rule to be recommended")
    parser.add_argument("--force", action="store_true", help="record again even where a cache exists")
    known = {s for a in parser._actions for s in a.option_strings}
    rest, lists = split_list_options(argv, ("--rules", "--criteria"), known)
    args = parser.parse_args(rest)
    args.rules = lists.get("--rules") or ["--tau 1", "--tau 0"]
    args.criteria = lists.get("--criteria") or [""]
    for criterion in args.criteria:
        for item in shlex.split(criterion):
            if "=" not in item:
                parser.error(f"criterion {criterion!r}: {item!r} is not KEY=VALUE")
    return args


# --- recording and analysing ----------------------------------------------------------------------
def run_cli(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run one ffnscope command, output appended to log; (return code, seconds)."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - start


def tail(log: Path, lines: int = 12) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + line for line in text[-lines:])


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[:40] or "x"


@dataclass
class Half:
    part: int
    path: Path
    record_s: float | None = None   # None: reused
    analyze_s: float = 0.0
    error: str = ""


def record_args(args, rule: str) -> list[str]:
    cmd = ["--model", args.model, "--data", *args.data, "--tokens", str(args.tokens)]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    if args.layers:
        cmd += ["--layers", args.layers]
    return cmd + shlex.split(args.record_args) + shlex.split(rule)


def cache_paths(args, rule: str) -> list[Path]:
    settings = record_args(args, rule)
    digest = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]
    name = f"{slug(Path(args.model).name)}-{args.tokens}-{slug(rule)}-{digest}"
    return [args.out_dir / f"{name}-part{i}of2.h5" for i in (1, 2)]


def ensure_recorded(args, rule: str) -> list[Half]:
    halves = []
    for i, path in enumerate(cache_paths(args, rule), start=1):
        half = Half(i, path)
        halves.append(half)
        status = None if args.force else jobs.cache_status(path)  # None also for unreadable: recorded again
        if status == COMPLETE:
            print(f"  part {i}/2: reusing {path}", flush=True)
            continue
        cmd = [*CLI, "record", *record_args(args, rule), "--part", f"{i}/2", "--out", str(path), "--quiet"]
        for opt, value in (("--shard-tokens", args.shard_tokens), ("--batch-tokens", args.batch_tokens),
                           ("--device", args.device)):
            if value is not None:
                cmd += [opt, str(value)]
        cmd += ["--resume"] if status == "partial" else ["--force"] if path.exists() else []
        print(f"  part {i}/2: recording{' (resuming)' if status == 'partial' else ''} -> {path}", flush=True)
        rc, secs = run_cli(cmd, path.with_suffix(".log"))
        half.record_s = secs
        if rc != 0:
            half.error = f"record failed (exit {rc}) after {secs:.0f} s; log {path.with_suffix('.log')}:\n" + \
                tail(path.with_suffix(".log"))
            print(half.error, flush=True)
        else:
            print(f"  part {i}/2: recorded in {secs:.1f} s", flush=True)
    return halves


def analyze(half: Half, criterion: str) -> bool:
    """Analyse one half with the criterion's settings; False on failure (half.error says why)."""
    log = half.path.with_suffix(".log")
    sets = shlex.split(criterion)
    cmd = [*CLI, "analyze", str(half.path)] + (["--set", *sets] if sets else [])
    rc, secs = run_cli(cmd, log)
    half.analyze_s = secs
    if rc != 0:
        half.error = f"analyze failed (exit {rc}); log {log}:\n" + tail(log)
        return False
    return True


# --- comparing: engine.explore.reproduce, as `ffnscope reproduce A B` -------------------------------
@dataclass
class Halves:
    """The engine's comparison of two halves, and what this script adds: dead per recorded threshold."""
    outcome: object                                  # engine.explore.reproduce.Outcome
    n_layers: int                                    # the model's
    dead: dict[str, tuple[set, set]] = field(default_factory=dict)   # threshold label -> (dead in A, in B)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.outcome.comparison.layer.tolist()))


def compare_halves(halves: list[Half]) -> Halves:
    """Checks the pair and compares it finding by finding (UserError for a pair the engine refuses)."""
    from ffnscope.cache.reader import CacheReader

    outcome = reproduce(halves[0].path, halves[1].path)
    dead = {}
    with CacheReader(halves[0].path) as a, CacheReader(halves[1].path) as b:
        n_layers = a.provenance.model.n_layers
        da, db = dead_sets(a), dead_sets(b)
    for label in da:
        dead[label] = (da[label], db.get(label, set()))
    return Halves(outcome, n_layers, dead)


def dead_sets(reader) -> dict[str, set]:
    """Neurons that never fired, per recorded threshold (the engine compares the firing rule's and
    tau 0's; the others show which rule's dead neurons reproduce), from the cache's fire counts."""
    import numpy as np
    rec = reader.meta["recording"]
    out: dict[str, set] = {}
    for layer in reader.layers:
        counts = reader.array(layer, "fire_count")
        for i, tau in enumerate(rec["taus"]):
            label = f"tau {tau:g}" + (" (never activated)" if tau == 0 else "")
            out.setdefault(label, set()).update((layer, int(n)) for n in np.flatnonzero(counts[i] == 0))
    return out


def layer_groups(n_layers: int, layers: list[int]) -> list[tuple[str, list[int]]]:
    half = n_layers // 2
    groups = [("all", layers)]
    early = [layer for layer in layers if layer < half]
    late = [layer for layer in layers if layer >= half]
    if early and late:
        groups += [(f"{early[0]}-{early[-1]}", early), (f"{late[0]}-{late[-1]}", late)]
    return groups


def pct(x: float | None) -> str:
    return "   -" if x is None or math.isnan(x) else f"{100 * x:4.0f}%"


def note(c: Category) -> str:
    """The engine's extra counts of one category (engine.explore.reproduce.Category)."""
    parts = []
    if c.other is not None and c.a and c.b:
        same = c.both
        parts.append(f"same triggers {same}/{same + c.other}")
    if c.same_type is not None and c.both:
        parts.append(f"same type {c.same_type}/{c.both} ({pct(c.same_type / c.both).strip()})")
    if c.compared:
        parts.append(f"verdict agrees on {c.agree}/{c.compared} detectors of both "
                     f"({pct(c.agree / c.compared).strip()})")
    if c.left_out:
        parts.append(f"{c.left_out} found in one half, undecided in the other")
    if not c.analysed:
        parts.append("not analysed")
    return "; ".join(parts)


def report(rule: str, criterion: str, halves: list[Half], found: Halves) -> dict:
    """Print one rule's tables; return the all-layer categories (engine.explore.reproduce.Category) by name."""
    import numpy as np

    head = f"rule {rule!r}" + (f", criterion {criterion!r}" if criterion else "")
    times = "; ".join(f"part {h.part}/2 " + ("reused" if h.record_s is None else f"recorded in {h.record_s:.1f} s")
                      + f", analysed in {h.analyze_s:.1f} s" for h in halves)
    comparison = found.outcome.comparison
    layers = found.layers
    print(f"\n=== {head}\n    {times}")
    print(f"    A = part 1/2, B = part 2/2; {len(comparison.layer)} neurons in layers {layers[0]}-{layers[-1]}")
    for text in found.outcome.notes:
        print(f"    note: {text}")
    print(f"    {'analysis':<24} {'layers':>7} {'A':>6} {'B':>6} {'A&B':>6} {'repro':>6} {'Jacc.':>6}  same")
    result = {}
    groups = layer_groups(found.n_layers, layers)
    by_group = {label: comparison.summary(np.isin(comparison.layer, group)) for label, group in groups}
    for i, name in enumerate(comparison.codes):
        for label, _ in groups:
            c = by_group[label][i]
            if not c.a and not c.b and label != "all":
                continue
            print(f"    {c.label if label == 'all' else '':<24} {label:>7} {c.a:>6} {c.b:>6} {c.both:>6} "
                  f"{pct(c.a_share):>6} {pct(c.jaccard):>6}  {note(c)}")
            if label == "all":
                result[name] = c
    print(f"    {'dead (never fired)':<24} {'layers':>7} {'A %':>6} {'B %':>6} {'A&B':>6} {'repro':>6} {'Jacc.':>6}")
    n = max(len(comparison.layer), 1)
    for label, (da, db) in found.dead.items():
        both, union = len(da & db), len(da | db)
        print(f"    {label:<24} {'all':>7} {100 * len(da) / n:6.2f} {100 * len(db) / n:6.2f} {both:>6} "
              f"{pct(both / len(da) if da else None):>6} {pct(both / union if union else None):>6}")
    return result


def pooled(comps: dict[str, Category]) -> tuple[float, float, float]:
    """(pooled symmetric reproducibility, findings (mean of A and B), its standard error)."""
    both = sum(comps[k].both for k in MAIN if k in comps)
    count = sum((comps[k].a + comps[k].b) / 2 for k in MAIN if k in comps)
    if count == 0:
        return math.nan, 0.0, math.nan
    p = min(both / count, 1.0)
    return p, count, math.sqrt(max(p * (1 - p), 1e-12) / count)


def pick(rows: list[tuple[tuple[float, float, float], object]], min_count: int, name) -> tuple[str, object]:
    """rows of ((reproducibility, count, SE), key): the best with enough findings, in words."""
    rows = sorted(rows, key=lambda r: -(r[0][0] if r[0][1] and not math.isnan(r[0][0]) else -1))
    ok = [r for r in rows if r[0][1] >= min_count and not math.isnan(r[0][0])]
    if not ok:
        summary = ", ".join(f"{name(k)} {pct(p).strip()} of {cnt:.0f}" for (p, cnt, _), k in rows)
        return f"counts too small to decide (fewer than {min_count} findings each: {summary}); record more tokens", None
    (p, cnt, se), best = ok[0]
    line = f"{name(best)}: {pct(p).strip()} of {cnt:.0f} reproduced"
    if len(ok) > 1:
        (p2, cnt2, se2), second = ok[1]
        close = p - p2 < 2 * math.hypot(se, se2)
        line += (f", {'not clearly ahead of' if close else 'ahead of'} {name(second)} ({pct(p2).strip()} of "
                 f"{cnt2:.0f}{', within 2 SE' if close else ''})")
    small = [r for r in rows if r not in ok]
    if small:
        line += "; too few findings to judge " + ", ".join(f"{name(k)} ({cnt:.0f})" for (_, cnt, _), k in small)
    return line, best


def recommend(scores: dict[tuple[str, str], dict[str, Category]], criteria: list[str], min_count: int) -> str:
    """The rule by pooled reproducibility (under the first criterion); with several criteria, the
    positional criterion by positional neurons' reproducibility under that rule."""
    first = {rule: comps for (rule, crit), comps in scores.items() if crit == criteria[0]}
    if not first:
        return "recommendation: nothing to compare"
    text, rule = pick([(pooled(c), r) for r, c in first.items()], min_count, repr)
    line = "recommendation: firing rule " + text
    if len(criteria) > 1:
        rule = rule if rule is not None else next(iter(first))
        rows = [(pooled({"positional": c["positional"]}), crit)
                for (r, crit), c in scores.items() if r == rule and "positional" in c]
        text, _ = pick(rows, min_count, lambda c: repr(c or "defaults"))
        line += f" | positional criterion (under {rule!r}) " + text
    return line


def summary(scores: dict[tuple[str, str], dict[str, Category]], times: dict[str, list[float | None]],
            n_criteria: int) -> None:
    """One row per rule (and criterion): A / B / found again and reproducibility per analysis, pooled."""
    print("summary (all recorded layers; per analysis: A/B/A&B repro; pooled = sum A&B / sum (A+B)/2)")
    width = max(len(repr(r) + (f" {c!r}" if n_criteria > 1 else "")) for r, c in scores)
    width = max(width, 4)
    print(f"  {'rule':<{width}}  " + "  ".join(f"{k:<22}" for k in MAIN) + f"  {'pooled':>13}  record s (A, B)")
    for (rule, crit), comps in scores.items():
        label = repr(rule) + (f" {crit!r}" if n_criteria > 1 else "")
        cells = []
        for k in MAIN:
            c = comps.get(k)
            cells.append(f"{c.a}/{c.b}/{c.both} {pct(c.a_share).strip()}" if c else "-")
        p, cnt, _ = pooled(comps)
        secs = ", ".join("reused" if t is None else f"{t:.0f}" for t in times.get(rule, []))
        print(f"  {label:<{width}}  " + "  ".join(f"{c:<22}" for c in cells) +
              f"  {pct(p).strip():>5} of {cnt:<5.0f}  {secs}")


def main() -> None:
    args = parse_args(sys.argv[1:])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"split-half reproducibility: model {args.model}, data {' '.join(args.data)}, {args.tokens} tokens "
          f"({args.tokens // 2} per half), layers {args.layers or 'all'}, caches in {args.out_dir}", flush=True)
    scores: dict[tuple[str, str], dict[str, Category]] = {}
    times: dict[str, list[float | None]] = {}
    failures = []
    for rule in args.rules:
        print(f"\n--- rule {rule!r}", flush=True)
        halves = ensure_recorded(args, rule)
        times[rule] = [h.record_s for h in halves]
        if any(h.error for h in halves):
            failures.append(f"{rule!r}: " + "; ".join(h.error.splitlines()[0] for h in halves if h.error))
            continue
        for criterion in args.criteria:
            ok = all([analyze(h, criterion) for h in halves])
            try:
                found = compare_halves(halves) if ok else None
            except UserError as exc:  # a pair the engine refuses (it says why in one line)
                halves[0].error, found = f"reproduce refused: {exc}", None
            if found is None:
                for h in halves:
                    if h.error:
                        print(h.error)
                failures.append(f"{rule!r} {criterion!r}: " + "; ".join(h.error.splitlines()[0]
                                                                         for h in halves if h.error))
                for h in halves:
                    h.error = ""
                continue
            scores[(rule, criterion)] = report(rule, criterion, halves, found)
            sys.stdout.flush()
    print()
    if failures:
        print("failed: " + " | ".join(failures))
    if scores:
        summary(scores, times, len(args.criteria))
    print(f"total {time.perf_counter() - start:.0f} s")
    print(recommend(scores, args.criteria, args.min_count))


if __name__ == "__main__":
    main()
