"""N-gram coverage and detectors (Voita et al. 2023, Sec. 4.1-4.3, App. A). Numpy only.

A neuron's coverage number for n-grams is the smallest number of n-grams, most frequent triggers
first, that account for >= `coverage` (95 %) of its fires. An n-gram is covered by the neuron when
the neuron fires on >= `covered` (95 %) of the n-gram's occurrences. A neuron is a detector when its
coverage number is at most `max_coverage` and its covered n-grams account for >= `coverage` of its
fires. Fires whose n-gram would include the start token are not counted (the paper excludes BOS).

The support rule is ours, not the paper's: a covered n-gram must occur at least `min_occurrences`
times (default 5). The paper sets no minimum (`min_occurrences` 1), so a token seen once on which
the neuron fired is "covered" and can make a one-fire detector. Every verdict therefore carries its
evidence: the occurrences of the neuron's covered triggers, its fires on them and, per trigger, both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ffnscope.cache.state import NGRAM_ORDERS, GramCounts, Sparse

COVERAGE_BUCKETS = ((1, 5), (6, 10), (11, 20), (21, 50), (51, 200), (201, 1000), (1001, 2000), (2001, None))
NOT_COUNTED = -1  # coverage of a neuron whose n-gram counts were not kept (never "no detector")


@dataclass(frozen=True)
class NgramParams:
    coverage: float = 0.95         # share of a neuron's fires its triggers must explain
    covered: float = 0.95          # share of an n-gram's occurrences the neuron must fire on
    min_occurrences: int = 5       # an n-gram seen fewer times is never "covered"
    max_coverage_1: int = 5        # token detectors: 1-5 tokens (paper)
    max_coverage_2: int = 50       # bigram detectors: our choice, as trigrams
    max_coverage_3: int = 50       # trigram detectors: 1-50 trigrams (paper)

    def max_coverage(self, n: int) -> int:
        return {1: self.max_coverage_1, 2: self.max_coverage_2, 3: self.max_coverage_3}[n]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class NgramResult:
    """One layer, one n. Arrays over neurons unless said otherwise."""
    n: int
    fires: np.ndarray          # (d_ffn,) int64 fires counted for this n (start-token n-grams excluded)
    coverage: np.ndarray       # (d_ffn,) int64 coverage number; 0 = never fired; NOT_COUNTED = not kept
    detector: np.ndarray       # (d_ffn,) bool
    covered_neuron: np.ndarray  # (c,) int32 } the covered n-grams of detectors, one row per
    covered_gram: np.ndarray    # (c,) int64 } (detector, n-gram), most fires first per detector
    covered_count: np.ndarray   # (c,) int64 } the neuron's fires on the n-gram
    covered_occurrences: np.ndarray  # (c,) int64 } the n-gram's occurrences in the data
    # the evidence of every neuron's covered n-grams (detector or not): their occurrences summed and
    # the neuron's fires on them (the detector rule: trigger_fires >= coverage * fires)
    trigger_occurrences: np.ndarray  # (d_ffn,) int64
    trigger_fires: np.ndarray        # (d_ffn,) int64


def _narrow(values: np.ndarray, bound: int) -> np.ndarray:
    """Sort keys in [0, bound) in the narrowest unsigned type that holds them: the same order, and
    numpy's stable sort (lexsort's) is a radix sort on 16-bit keys, several times faster than on int64."""
    for kind in (np.uint16, np.uint32):
        if bound <= np.iinfo(kind).max + 1:
            return values.astype(kind)
    return values


def coverage_numbers(sparse: Sparse, d_ffn: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """-> (fires per neuron, coverage number per neuron; 0 where the neuron never fired)."""
    fires = np.bincount(sparse.neuron, weights=sparse.count, minlength=d_ffn).astype(np.int64)
    top = int(sparse.count.max()) + 1 if len(sparse) else 1
    # per neuron, biggest triggers first
    order = np.lexsort((_narrow(top - 1 - sparse.count, top), _narrow(sparse.neuron, d_ffn)))
    count = sparse.count[order]
    sizes = np.bincount(sparse.neuron, minlength=d_ffn)  # pairs per neuron: per-pair values by np.repeat
    neuron = np.repeat(np.arange(d_ffn), sizes)          # sparse.neuron[order], written in one pass
    starts = np.cumsum(sizes) - sizes
    cum = np.concatenate([[0], np.cumsum(count)])
    within = cum[1:] - np.repeat(cum[starts], sizes)  # this neuron's fires up to and including each gram
    short = within < share * np.repeat(fires, sizes)            # still below the share after this gram
    coverage = np.bincount(neuron[short], minlength=d_ffn) + 1
    coverage[fires == 0] = 0
    return fires, coverage.astype(np.int64)


def gram_occurrences(grams: GramCounts, keys: np.ndarray) -> np.ndarray:
    """grams.count of each of `keys` (all of them in grams.gram), searched once per run of equal keys:
    the pairs come sorted by gram, and many neurons fire on one n-gram, so the runs are long."""
    if not len(keys):
        return np.zeros(0, np.int64)
    heads = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return np.repeat(grams.count[np.searchsorted(grams.gram, keys[heads])], np.diff(np.append(heads, len(keys))))


def ngram_layer(sparse: Sparse, grams: GramCounts, counted: np.ndarray, n: int,
                params: NgramParams = NgramParams()) -> NgramResult:
    d_ffn = len(counted)
    fires, coverage = coverage_numbers(sparse, d_ffn, params.coverage)
    occurrences = gram_occurrences(grams, sparse.gram)
    is_covered = (occurrences >= params.min_occurrences) & (sparse.count >= params.covered * occurrences)
    covered_fires = np.bincount(sparse.neuron[is_covered], weights=sparse.count[is_covered],
                                minlength=d_ffn).astype(np.int64)
    covered_occurrences = np.bincount(sparse.neuron[is_covered], weights=occurrences[is_covered],
                                      minlength=d_ffn).astype(np.int64)
    detector = ((coverage >= 1) & (coverage <= params.max_coverage(n))
                & (covered_fires >= params.coverage * fires) & counted)
    coverage[~counted] = NOT_COUNTED
    keep = is_covered & detector[sparse.neuron]
    order = np.lexsort((-sparse.count[keep], sparse.neuron[keep]))
    return NgramResult(n, fires, coverage, detector, sparse.neuron[keep][order], sparse.gram[keep][order],
                       sparse.count[keep][order], occurrences[keep][order].astype(np.int64),
                       covered_occurrences, covered_fires)


def detector_fire_bound(counts: dict[int, np.ndarray], n_seqs: int, seq_len: int, first_pos: int,
                        params: NgramParams = NgramParams()) -> dict:
    """The most fires (at the primary rule, over all the data) a detector of any order can have.

    A detector of order n has coverage number c <= max_coverage(n): its c most frequent triggers
    explain >= `coverage` of its n-gram fires, and a neuron fires on an n-gram at most as often as
    the n-gram occurs. So coverage * fires_n <= S_n, the occurrences of the data's max_coverage(n)
    most frequent n-grams. fires_n leaves out the positions whose n-gram would hold the start token
    (first_pos + n - 1 per sequence), where the neuron may fire too. A neuron whose fires exceed
    max over n of ceil(S_n / coverage) + n_seqs * (first_pos + n - 1) is a detector of no order
    under these parameters (or stricter ones: a higher coverage, smaller max_coverage).

    counts: n -> occurrence counts of the data's n-grams (start token excluded), any order of keys.
    -> {"fires": the bound, "per_order": {"1": ..}, "top_occurrences": {"1": S_1, ..}, "coverage",
    "max_coverage": [..], "tokens": n_seqs * seq_len, "freq": fires / tokens}, JSON-able."""
    per_order, top = {}, {}
    for n in NGRAM_ORDERS:
        k = params.max_coverage(n)
        c = np.asarray(counts[n], np.int64)
        s = int(np.partition(c, len(c) - k)[len(c) - k:].sum()) if len(c) > k else int(c.sum())
        top[str(n)] = s
        per_order[str(n)] = int(math.ceil(s / params.coverage)) + n_seqs * min(seq_len, first_pos + n - 1)
    tokens = n_seqs * seq_len
    fires = max(per_order.values())
    return {"fires": fires, "per_order": per_order, "top_occurrences": top, "coverage": params.coverage,
            "max_coverage": [params.max_coverage(n) for n in NGRAM_ORDERS], "tokens": tokens,
            "freq": fires / max(tokens, 1)}


def skip_status(counted: np.ndarray, fires: np.ndarray, bound: dict | None) -> dict[str, int]:
    """How the neurons of an n-gram layer stand: counted; skipped with proof (they fire more often than
    any detector can, over this recording); skipped without proof (left out by the calibration
    sample or a --ngram-max-freq cap, and within the bound: they could be detectors, so they have no
    verdict). Without a stored bound (older caches) every skipped neuron counts as unproven."""
    counted = np.asarray(counted, bool)
    over = np.asarray(fires) > bound["fires"] if bound else np.zeros(len(counted), bool)
    return {"counted": int(counted.sum()), "proven": int((~counted & over).sum()),
            "unproven": int((~counted & ~over).sum())}


def unigram_counts(unigram: np.ndarray) -> GramCounts:
    """The data's token counts in the sparse form the n-gram code takes."""
    tokens = np.flatnonzero(unigram)
    return GramCounts(tokens.astype(np.int64), unigram[tokens])


def coverage_histogram(coverage: np.ndarray) -> list[int]:
    """Alive, counted neurons per COVERAGE_BUCKETS bucket (paper Fig. 2)."""
    return [int(((coverage >= lo) & ((coverage <= hi) if hi else True)).sum()) for lo, hi in COVERAGE_BUCKETS]


def ensemble(detected: list[set[int]]) -> list[dict]:
    """Per layer: detected n-grams, new versus all lower layers and versus the previous layer,
    cumulative (paper Fig. 3b, 4, 15)."""
    rows, seen, previous = [], set(), set()
    for layer_set in detected:
        rows.append({"detected": len(layer_set), "new_overall": len(layer_set - seen),
                     "new_vs_previous": len(layer_set - previous), "cumulative": len(seen | layer_set)})
        seen |= layer_set
        previous = layer_set
    return rows


def support_rule(min_occurrences: int | None) -> str:
    """The support rule a detector count used, as every view states it beside the count."""
    if min_occurrences is None:
        return "detector rule unknown (not analyzed)"
    if min_occurrences <= 1:
        return "detectors: triggers seen >= 1 time (the paper's rule)"
    return f"detectors: triggers seen >= {min_occurrences} times (paper: >= 1)"
