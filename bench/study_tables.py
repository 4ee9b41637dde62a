"""The tables of docs/study-smollm2.md, printed as Markdown from two analysed halves and their merge.

    python bench/study_tables.py A.h5 B.h5 MERGED.h5 [--literal A1.h5 B1.h5 MERGED1.h5]

A and B are `record --part 1/2` and `--part 2/2` of one recording, MERGED their `ffnscope merge`, all
three analysed with the default rule; --literal names copies of the three analysed with
`--min-occurrences 1` (the paper's support rule). Prints per layer the figures the paper reports
(dead at both thresholds, alive frequency, the share of alive neurons covered by 1-5 tokens, detector
counts, suppression in both readings, positional neurons) and, per finding, the share the other half
finds again, for the model's first half of layers, its second half and all. Reads only: nothing is
written (engine.explore.reproduce without `into`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ffnscope.cache import analysis_store as store  # noqa: E402
from ffnscope.cache.reader import CacheReader  # noqa: E402
from ffnscope.engine.explore.reproduce import reproduce  # noqa: E402
from ffnscope.engine.explore.tables import layer_table  # noqa: E402


def _cell(value, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:,}"


def layers(merged: Path, literal: Path | None) -> None:
    with CacheReader(merged) as reader:
        table = list(layer_table(reader).rows())
        ngrams = store.read_group(reader, "ngrams")
        tokens = reader.n_tokens
    lit = None
    if literal:
        with CacheReader(literal) as reader:
            lit = {row["layer"]: row for row in layer_table(reader).rows()}
    # the share of alive, counted neurons whose fires 1-5 tokens cover (the paper's Fig. 2, first bucket)
    covered = {int(layer): hist[0] / max(sum(hist), 1)
               for layer, hist in zip(ngrams["layers"], ngrams["n1/coverage_hist"])}
    print(f"Per layer, the merged recording ({tokens:,} tokens); detectors at min_occurrences 5"
          + (" / 1 (the paper's rule)" if lit else "") + "\n")
    head = ["layer", "dead % τ=1", "dead % τ=0", "alive freq %", "1-5 tokens %", "token det", "bigram det",
            "trigram det", "supp % logit", "supp % z", "positional"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for row in table:
        layer = row["layer"]

        def det(key):
            own = _cell(row[key])
            return own if not lit or row[key] is None else f"{own} / {_cell(lit[layer][key])}"
        cells = [str(layer), _cell(row["dead_frac"], True), _cell(row["dead_tau0_frac"], True),
                 f"{100 * row['alive_freq']:.2f}" if row["alive_freq"] is not None else "-",
                 _cell(covered.get(layer), True), det("token_detectors"), det("bigram_detectors"),
                 det("trigram_detectors"), _cell(row["suppress_frac_logit"], True),
                 _cell(row["suppress_frac_z"], True), _cell(row["positional"])]
        print("| " + " | ".join(cells) + " |")
    print()


def found_again(a: Path, b: Path, rule: str) -> None:
    outcome = reproduce(a, b)
    comparison = outcome.comparison
    with CacheReader(a) as reader:
        half = reader.provenance.model.n_layers // 2
    groups = (("layers 0-%d" % (half - 1), comparison.layer < half), (f"layers {half}+", comparison.layer >= half),
              ("all", None))
    print(f"Found again in the other half ({rule}): |A| / |B| / |A&B|, and |A&B| / |A|\n")
    print("| finding | " + " | ".join(name for name, _ in groups) + " |")
    print("|---|" + "---:|" * len(groups))
    for i, category in enumerate(comparison.summary()):
        cells = []
        for _, rows in groups:
            c = comparison.summary(rows)[i]
            share = "-" if c.a_share is None else f"{100 * c.a_share:.0f} %"
            extra = ""
            if c.compared:
                extra = f"; agree on {c.agree}/{c.compared}"
            elif c.other:
                extra = f"; {c.other} other triggers"
            cells.append(f"{c.a:,} / {c.b:,} / {c.both:,} ({share}{extra})")
        print(f"| {category.label} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", type=Path, nargs=3, metavar="A B MERGED")
    parser.add_argument("--literal", type=Path, nargs=3, metavar="A B MERGED")
    args = parser.parse_args()
    a, b, merged = args.files
    layers(merged, args.literal[2] if args.literal else None)
    found_again(a, b, "min_occurrences 5")
    if args.literal:
        found_again(args.literal[0], args.literal[1], "min_occurrences 1, the paper's rule")


if __name__ == "__main__":
    main()
