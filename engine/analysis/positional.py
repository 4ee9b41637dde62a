"""Positional neurons (Voita et al. 2023, Sec. 5 and App. B; Figs. 7-9). Numpy only.

Input is the per-layer fire count per (position, neuron) over full-length sequences, so every
position is seen equally often and fr(pos) = pos_fire / n_seqs is the activation frequency at pos.

1. Mutual information between "fires" and position (App. B.1, natural log); positional if
   I > mi_threshold (paper: 0.05).
2. Type of each positional neuron, from intervals where fr(pos) stays at an extreme
   (near 0: fr <= extreme_eps; near 1: fr >= 1 - extreme_eps) for at least min_run positions.
   The sequence of such intervals, in position order with neighbours at the same extreme merged
   (0,0,1 -> 0,1), is the neuron's signature:
     oscillatory    both extremes, >= min_alternations intervals in the signature (0,1,0 ...)
     both_extremes  both extremes, fewer (typically a step: 1,0 or 0,1)
     one_extreme    intervals at only one of 0 or 1
     other          no interval at an extreme
3. Strong vs weak. First three types: strong if the signature is the same when intervals are
   taken at exactly 0 / exactly 1 (integer counts 0 or n_seqs), i.e. the pattern does not need
   the "near" tolerance; weak otherwise. "other": strong (smooth, a "thin" graph) if fr(pos) is
   well predicted by its neighbours: mean |fr(p) - (fr(p-1) + fr(p+1)) / 2| over interior
   positions, divided by the curve's range (max - min), is at most smooth_max_roughness.
4. For strong oscillatory and strong both_extremes neurons (indicators of position ranges,
   Fig. 9): the near-1 intervals, i.e. the position ranges the neuron indicates by firing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

KINDS = ("oscillatory", "both_extremes", "one_extreme", "other")
_CHUNK = 2048  # neurons per slice of the (seq_len, d_ffn) float arrays: bounds memory at ~100 MB


@dataclass(frozen=True)
class PositionalParams:
    mi_threshold: float = 0.05          # positional if I(act, pos) > this (paper)
    extreme_eps: float = 0.05           # fr <= eps is "near 0", fr >= 1 - eps "near 1" (weak); exact 0/1 strong
    min_run: int = 5                    # an interval at an extreme spans at least this many positions;
                                        # shorter touches are chance (few sequences per position)
    min_alternations: int = 4           # oscillatory: at least this many alternating extreme intervals
                                        # (4 = on-off-on-off: repeats); one window (off-on-off) is both_extremes
    smooth_max_roughness: float = 0.05  # "other" is strong (smooth) if neighbour roughness / range <= this

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PositionalResult:
    """Arrays over the neurons of one layer."""
    mi: np.ndarray          # (d_ffn,) float64, nats
    positional: np.ndarray  # (d_ffn,) bool
    kind: np.ndarray        # (d_ffn,) object: one of KINDS, "" where not positional
    strong: np.ndarray      # (d_ffn,) bool, False where not positional
    ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # strong oscillatory / both_extremes neuron -> [(start, end_exclusive), ...] where it fires


def mutual_information(freq_by_pos: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """I(act, pos) per neuron, in nats, for equally likely positions (App. B.1).

    freq_by_pos: (T, d) fr(pos) in [0, 1]; freq: (d,) its mean over positions. Uses 0 log 0 = 0,
    so dead (fr = 0) and always-on (fr = 1) neurons get exactly 0. Float round-off below 0 is
    clipped: MI is non-negative.
    """
    p = np.asarray(freq_by_pos, dtype=np.float64)
    q = np.asarray(freq, dtype=np.float64)[None, :]
    # np.where evaluates both branches; the discarded one may divide by 0, hence errstate.
    with np.errstate(divide="ignore", invalid="ignore"):
        on = np.where(p > 0, p * np.log(p / q), 0.0)
        off = np.where(p < 1, (1 - p) * np.log((1 - p) / (1 - q)), 0.0)
    return np.maximum((on + off).mean(axis=0), 0.0)


def positional_layer(pos_fire: np.ndarray, n_seqs: int,
                     params: PositionalParams = PositionalParams()) -> PositionalResult:
    """Find and type the positional neurons of one layer.

    pos_fire: (seq_len, d_ffn) integer, how many of the n_seqs full-length sequences fired each
    neuron at each position. MI is vectorised over slices of neurons; the per-neuron typing loop
    runs only over the (few) positional neurons.
    """
    pos_fire = np.asarray(pos_fire)
    if pos_fire.ndim != 2 or pos_fire.shape[0] == 0:
        raise ValueError(f"pos_fire must be (seq_len, d_ffn) with seq_len > 0, got {pos_fire.shape}")
    if n_seqs <= 0:
        raise ValueError("positional analysis needs at least one full-length sequence")
    if pos_fire.size and (pos_fire.min() < 0 or pos_fire.max() > n_seqs):
        raise ValueError(f"pos_fire counts must lie in [0, n_seqs={n_seqs}]")

    seq_len, d = pos_fire.shape
    # Overall frequency from exact integer sums: 0 < fr < 1 exactly when the neuron is neither dead
    # nor always on, so the logs in mutual_information never see 0/0 for a live branch.
    freq = pos_fire.sum(axis=0, dtype=np.int64) / (n_seqs * seq_len)
    mi = np.empty(d, dtype=np.float64)
    for lo in range(0, d, _CHUNK):
        hi = min(lo + _CHUNK, d)
        mi[lo:hi] = mutual_information(pos_fire[:, lo:hi] / n_seqs, freq[lo:hi])

    positional = mi > params.mi_threshold
    kind = np.full(d, "", dtype=object)
    strong = np.zeros(d, dtype=bool)
    ranges: dict[int, list[tuple[int, int]]] = {}
    for n in np.flatnonzero(positional):
        counts = pos_fire[:, n].astype(np.int64)
        k, s, on_runs = _classify(counts, n_seqs, params)
        kind[n], strong[n] = k, s
        if s and k in ("oscillatory", "both_extremes"):
            ranges[int(n)] = on_runs
    return PositionalResult(mi=mi, positional=positional, kind=kind, strong=strong, ranges=ranges)


def _runs(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """Maximal runs of True as [(start, end_exclusive)], keeping those of length >= min_len."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_len]


def _signature(low: np.ndarray, high: np.ndarray, min_run: int) -> list[int]:
    """Extremes (0 or 1) of the intervals in position order, neighbours at the same extreme merged."""
    runs = sorted([(a, 0) for a, _ in _runs(low, min_run)] + [(a, 1) for a, _ in _runs(high, min_run)])
    sig: list[int] = []
    for _, extreme in runs:
        if not sig or sig[-1] != extreme:
            sig.append(extreme)
    return sig


def _kind(sig: list[int], min_alternations: int) -> str:
    if not sig:
        return "other"
    if len(set(sig)) == 1:
        return "one_extreme"
    return "oscillatory" if len(sig) >= min_alternations else "both_extremes"


def _classify(counts: np.ndarray, n_seqs: int, p: PositionalParams) -> tuple[str, bool, list[tuple[int, int]]]:
    """(kind, strong, near-1 runs) for one neuron's fire counts over positions."""
    fr = counts / n_seqs
    near_high = fr >= 1 - p.extreme_eps
    loose = _signature(fr <= p.extreme_eps, near_high, p.min_run)
    kind = _kind(loose, p.min_alternations)
    if kind == "other":
        return kind, _roughness(fr) <= p.smooth_max_roughness, []
    exact = _signature(counts == 0, counts == n_seqs, p.min_run)
    return kind, exact == loose, _runs(near_high, p.min_run)


def _roughness(fr: np.ndarray) -> float:
    """Mean |fr(p) - mean of its two neighbours| over interior positions, relative to the range."""
    span = float(fr.max() - fr.min())
    if fr.size < 3 or span == 0:
        return 0.0
    return float(np.abs(fr[1:-1] - (fr[:-2] + fr[2:]) / 2).mean() / span)
