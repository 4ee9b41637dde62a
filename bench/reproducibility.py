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
re-analyses; a partial one is resumed), analysed with each criterion, and read back through the
stable interface, `ffnscope export --table neurons --format jsonl` (dead fractions per recorded
threshold come from the cache's fire counts).

Per rule and criterion it prints, per layer group (all recorded layers; those in the model's first
half; its second half) and per analysis: the count in A, in B, found again (the same layer and
neuron flagged in both), reproducibility |A&B|/|A|, the Jaccard index |A&B|/|A or B|, and for token
detectors whether the triggers are the same, for positional neurons whether the type is, for
suppression whether the verdict agrees on the detectors of both halves; then dead neurons per
recorded threshold in both halves (fractions, and how many dead in A are dead in B). A summary
table has one row per rule. The last line is the recommendation: the rule whose findings reproduce
best, pooled over the three analyses and so weighted by their counts (sum |A&B| / sum (|A|+|B|)/2,
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

from ffnscope.cache.schema import COMPLETE  # noqa: E402
from ffnscope.engine.jobs import launcher as jobs  # noqa: E402  (light: no torch)

CLI = [sys.executable, "-m", "ffnscope"]
# the findings compared; "suppressing detectors" are token detectors whose update suppresses their triggers
MAIN = ("token detectors", "positional neurons", "suppressing detectors")


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


def analyze_and_read(half: Half, criterion: str) -> dict | None:
    """Analyse one half with the criterion's settings and read its neuron table; None on failure."""
    log = half.path.with_suffix(".log")
    sets = shlex.split(criterion)
    cmd = [*CLI, "analyze", str(half.path)] + (["--set", *sets] if sets else [])
    rc, secs = run_cli(cmd, log)
    half.analyze_s = secs
    if rc != 0:
        half.error = f"analyze failed (exit {rc}); log {log}:\n" + tail(log)
        return None
    out = half.path.with_suffix(".neurons.jsonl")
    out.unlink(missing_ok=True)
    rc, secs = run_cli([*CLI, "export", str(half.path), "--table", "neurons", "--format", "jsonl", "--out", str(out)],
                       log)
    half.analyze_s += secs
    if rc != 0:
        half.error = f"export failed (exit {rc}); log {log}:\n" + tail(log)
        return None
    return read_neurons(out, half.path)


# --- reading ------------------------------------------------------------------------------------
@dataclass
class Findings:
    n_layers: int                                   # the model's
    layers: list[int]                               # recorded
    sets: dict[str, set] = field(default_factory=dict)          # analysis -> {(layer, neuron)}
    unknown: dict[str, set] = field(default_factory=dict)       # analysis -> neurons with no verdict
    triggers: dict[tuple, frozenset] = field(default_factory=dict)
    pos_type: dict[tuple, str] = field(default_factory=dict)
    suppresses: dict[tuple, bool | None] = field(default_factory=dict)   # per token detector
    dead: dict[str, set] = field(default_factory=dict)         # threshold label -> dead neurons
    n_neurons: int = 0
    positional_note: str = ""


def suppress_column(row: dict) -> str | None:
    """The suppression verdict's column: suppresses_triggers, or whatever it is renamed to."""
    if "suppresses_triggers" in row:
        return "suppresses_triggers"
    names = [k for k in row if k.startswith("suppress")]
    return names[0] if names else None


def read_neurons(jsonl: Path, cache: Path) -> Findings:
    from ffnscope.cache.reader import CacheReader
    with CacheReader(cache) as reader:
        meta = reader.meta
        layers = list(reader.layers)
        dead = dead_sets(reader)
        note = ""
        try:
            from ffnscope.cache import analysis_store as store
            from ffnscope.engine.analysis.positional import stored_note
            note = stored_note(store.read_group(reader, "positional"))
        except Exception:  # noqa: BLE001 - a note only
            pass
    found = Findings(meta["model"]["n_layers"], layers, positional_note=note)
    names = {"token detectors": "token_detector", "bigram detectors": "bigram_detector",
             "trigram detectors": "trigram_detector", "positional neurons": "positional",
             "strong positional": None, "suppressing detectors": None}
    for name in names:
        found.sets[name], found.unknown[name] = set(), set()
    supp_col = None
    rule_dead, tau0_dead = set(), set()
    with open(jsonl) as f:
        for line in f:
            row = json.loads(line)
            key = (row["layer"], row["neuron"])
            found.n_neurons += 1
            if supp_col is None:
                supp_col = suppress_column(row) or ""
            for name, col in names.items():
                if col is None:
                    continue
                value = row.get(col)
                if value is None:
                    found.unknown[name].add(key)
                elif value:
                    found.sets[name].add(key)
            if row.get("token_detector"):
                found.triggers[key] = frozenset(row.get("trigger_tokens") or ())
                verdict = row.get(supp_col) if supp_col else None
                found.suppresses[key] = verdict
                if verdict:
                    found.sets["suppressing detectors"].add(key)
                elif verdict is None:
                    found.unknown["suppressing detectors"].add(key)
            if row.get("positional"):
                found.pos_type[key] = row.get("pos_type") or "?"
                if row.get("pos_strong"):
                    found.sets["strong positional"].add(key)
            if row.get("dead"):
                rule_dead.add(key)
            if row.get("dead_tau0"):
                tau0_dead.add(key)
    found.dead = dead or {"tau 0 (never activated)": tau0_dead, "the rule": rule_dead}
    return found


def dead_sets(reader) -> dict[str, set]:
    """Neurons that never fired, per recorded threshold, from the cache's fire counts; {} if unreadable."""
    import numpy as np
    try:
        rec = reader.meta["recording"]
        taus = rec["taus"]
        out: dict[str, set] = {}
        for layer in reader.layers:
            counts = reader.array(layer, "fire_count")
            for i, tau in enumerate(taus):
                label = f"tau {tau:g}" + (" (never activated)" if tau == 0 else "")
                out.setdefault(label, set()).update((layer, int(n)) for n in np.flatnonzero(counts[i] == 0))
            if rec.get("tau_rule", "absolute") != "absolute":
                primary = reader.primary_fire_count(layer)
                out.setdefault(f"the rule ({rec['tau_rule']})", set()).update(
                    (layer, int(n)) for n in np.flatnonzero(primary == 0))
        return out
    except Exception:  # noqa: BLE001 - schema in flux: fall back to the exported dead columns
        return {}


# --- comparing ----------------------------------------------------------------------------------
@dataclass
class Compare:
    a: int
    b: int
    both: int
    b_unknown: int = 0      # of A, with no verdict in B

    @property
    def repro(self) -> float:
        return self.both / self.a if self.a else math.nan

    @property
    def jaccard(self) -> float:
        union = self.a + self.b - self.both
        return self.both / union if union else math.nan


def compare(a: set, b: set, b_unknown: set = frozenset()) -> Compare:
    return Compare(len(a), len(b), len(a & b), len(a & b_unknown))


def layer_groups(found: Findings) -> list[tuple[str, set]]:
    half = found.n_layers // 2
    groups = [("all", set(found.layers))]
    early = [layer for layer in found.layers if layer < half]
    late = [layer for layer in found.layers if layer >= half]
    if early and late:
        groups += [(f"{early[0]}-{early[-1]}", set(early)), (f"{late[0]}-{late[-1]}", set(late))]
    return groups


def within(keys: set, layers: set) -> set:
    return {k for k in keys if k[0] in layers}


def pct(x: float) -> str:
    return "   -" if math.isnan(x) else f"{100 * x:4.0f}%"


def extra(name: str, shared: set, a: Findings, b: Findings) -> str:
    if not shared:
        return ""
    n = len(shared)
    if name == "token detectors":
        same = sum(a.triggers.get(k) == b.triggers.get(k) for k in shared)
        common = sum(bool((a.triggers.get(k) or set()) & (b.triggers.get(k) or set())) for k in shared)
        return f"same triggers {same}/{n} ({pct(same / n).strip()}), any common {common}/{n}"
    if name == "positional neurons":
        same = sum(a.pos_type.get(k) == b.pos_type.get(k) for k in shared)
        return f"same type {same}/{n} ({pct(same / n).strip()})"
    return ""


def report(rule: str, criterion: str, halves: list[Half], a: Findings, b: Findings) -> dict[str, Compare]:
    """Print one rule's tables; return the all-layer comparisons of the main analyses."""
    head = f"rule {rule!r}" + (f", criterion {criterion!r}" if criterion else "")
    times = "; ".join(f"part {h.part}/2 " + ("reused" if h.record_s is None else f"recorded in {h.record_s:.1f} s")
                      + f", analysed+exported in {h.analyze_s:.1f} s" for h in halves)
    print(f"\n=== {head}\n    {times}")
    print(f"    A = part 1/2, B = part 2/2; {a.n_neurons} neurons in layers {a.layers[0]}-{a.layers[-1]}")
    for note in {a.positional_note, b.positional_note} - {""}:
        print(f"    note: {note}")
    print(f"    {'analysis':<24} {'layers':>7} {'A':>6} {'B':>6} {'A&B':>6} {'repro':>6} {'Jacc.':>6}  same")
    result = {}
    for name in a.sets:
        for label, layers in layer_groups(a):
            sa, sb = within(a.sets[name], layers), within(b.sets[name], layers)
            if not sa and not sb and label != "all":
                continue
            c = compare(sa, sb, within(b.unknown[name], layers))
            note = extra(name, sa & sb, a, b)
            if name == "suppressing detectors":
                both = within(set(a.suppresses) & set(b.suppresses), layers)
                known = [k for k in both if a.suppresses[k] is not None and b.suppresses[k] is not None]
                agree = sum(a.suppresses[k] == b.suppresses[k] for k in known)
                if known:
                    note = f"verdict agrees on {agree}/{len(known)} detectors of both ({pct(agree / len(known)).strip()})"
            if c.b_unknown:
                note = (note + "; " if note else "") + f"{c.b_unknown} of A have no verdict in B"
            print(f"    {name if label == 'all' else '':<24} {label:>7} {c.a:>6} {c.b:>6} {c.both:>6} "
                  f"{pct(c.repro):>6} {pct(c.jaccard):>6}  {note}")
            if label == "all":
                result[name] = c
    print(f"    {'dead (never fired)':<24} {'layers':>7} {'A %':>6} {'B %':>6} {'A&B':>6} {'repro':>6} {'Jacc.':>6}")
    n = max(a.n_neurons, 1)
    for label in a.dead:
        da, db = a.dead[label], b.dead.get(label, set())
        c = compare(da, db)
        print(f"    {label:<24} {'all':>7} {100 * len(da) / n:6.2f} {100 * len(db) / n:6.2f} {c.both:>6} "
              f"{pct(c.repro):>6} {pct(c.jaccard):>6}")
    return result


def pooled(comps: dict[str, Compare]) -> tuple[float, float, float]:
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


def recommend(scores: dict[tuple[str, str], dict[str, Compare]], criteria: list[str], min_count: int) -> str:
    """The rule by pooled reproducibility (under the first criterion); with several criteria, the
    positional criterion by positional neurons' reproducibility under that rule."""
    first = {rule: comps for (rule, crit), comps in scores.items() if crit == criteria[0]}
    if not first:
        return "recommendation: nothing to compare"
    text, rule = pick([(pooled(c), r) for r, c in first.items()], min_count, repr)
    line = "recommendation: firing rule " + text
    if len(criteria) > 1:
        rule = rule if rule is not None else next(iter(first))
        rows = [(pooled({"positional neurons": c["positional neurons"]}), crit)
                for (r, crit), c in scores.items() if r == rule and "positional neurons" in c]
        text, _ = pick(rows, min_count, lambda c: repr(c or "defaults"))
        line += f" | positional criterion (under {rule!r}) " + text
    return line


def summary(scores: dict[tuple[str, str], dict[str, Compare]], times: dict[str, list[float | None]],
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
            cells.append(f"{c.a}/{c.b}/{c.both} {pct(c.repro).strip()}" if c else "-")
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
    scores: dict[tuple[str, str], dict[str, Compare]] = {}
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
            found = [analyze_and_read(h, criterion) for h in halves]
            if any(f is None for f in found):
                for h in halves:
                    if h.error:
                        print(h.error)
                failures.append(f"{rule!r} {criterion!r}: " + "; ".join(h.error.splitlines()[0]
                                                                         for h in halves if h.error))
                for h in halves:
                    h.error = ""
                continue
            scores[(rule, criterion)] = report(rule, criterion, halves, *found)
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
