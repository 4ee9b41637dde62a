"""Positional neurons (Voita et al. 2023, Sec. 5 and App. B; Figs. 7-9). Numpy only.

Input is the per-layer fire count per (position, neuron) over full-length sequences, so every
position is seen equally often and fr(pos) = pos_fire / n_seqs is the activation frequency at pos.

1. Mutual information between "fires" and position (App. B.1, natural log), corrected for chance.
   The paper's plug-in estimate I_plugin is biased upward: a neuron whose firing does not depend on
   position at all still shows I_plugin ~ (T - 1) / (2 N) nats (N = n_seqs * T tokens over T
   positions; ~ 1 / (2 n_seqs), 0.06 at 8 sequences per position). The chance level of each neuron
   is computed exactly under the null "fires at its overall rate fr at every position, independently
   across sequences" (fire count at a position ~ Binomial(n_seqs, fr)):
       chance = E[KL(k / n_seqs || fr)] - E[KL(K / N || fr)],  k ~ Bin(n_seqs, fr), K ~ Bin(N, fr)
   (the first term: the mean per-position divergence from the true rate; the second: what estimating
   the rate from the same data takes back; for many firings it is (T - 1) / (2 N), Miller-Madow's
   correction for this 2 x T table, and it is smaller for rare neurons). The stored `mi` is
   max(I_plugin - chance, 0). A neuron is positional if mi > mi_threshold (paper: 0.05) AND
   I_plugin beats the null_quantile (0.999) quantile of its chance distribution (a gamma with the
   null's mean and variance, Wilson-Hilferty quantile; variance Var[KL(k / n_seqs || fr)] (T-1)/T^2),
   so among tens of thousands of neurons almost none is flagged by sampling noise.
   With too few sequences per position no neuron is called (see call_limit): when chance MI at the
   worst rate reaches mi_threshold (bias), when the null's spread above chance reaches it (noise), or
   when even a perfect indicator could not pass. The null assumes positions independent within a
   sequence; firing that runs over long stretches of one document spreads chance MI further, which
   only more sequences per position can tell from position dependence.
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

import functools
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

from ffnscope.cache.schema import POSITIONAL_KINDS

KINDS = POSITIONAL_KINDS  # the neuron types, in the order their codes are stored
_CHUNK = 2048  # neurons per slice of the (seq_len, d_ffn) float arrays: bounds memory at ~100 MB


@dataclass(frozen=True)
class PositionalParams:
    mi_threshold: float = 0.05          # positional if chance-corrected I(act, pos) > this (paper's threshold)
    null_quantile: float = 0.999        # ... and the plug-in I beats this quantile of its chance distribution
    extreme_eps: float = 0.05           # fr <= eps is "near 0", fr >= 1 - eps "near 1" (weak); exact 0/1 strong
    min_run: int = 5                    # an interval at an extreme spans at least this many positions;
                                        # shorter touches are chance (few sequences per position)
    min_alternations: int = 4           # oscillatory: at least this many alternating extreme intervals
                                        # (4 = on-off-on-off: repeats); one window (off-on-off) is both_extremes
    smooth_max_roughness: float = 0.05  # "other" is strong (smooth) if neighbour roughness / range <= this

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CallLimit:
    """Whether n_seqs sequences per position are enough to call positional neurons at mi_threshold."""
    n_seqs: int         # full-length sequences recorded, i.e. observations per position
    seq_len: int
    min_seqs: int       # fewest sequences per position that allow a call (-1: no number does, seq_len 1)
    chance_mi: float    # chance plug-in MI at n_seqs for the worst fire rate (~ (T - 1) / (2 N))
    too_few: bool       # no neuron is called: n_seqs does not allow a call at mi_threshold

    def message(self) -> str:
        return too_few_message(self.too_few, self.n_seqs, self.min_seqs, self.chance_mi)


def too_few_message(too_few: bool, n_seqs: int, min_seqs: int, chance_mi: float) -> str:
    """The note every view shows when no positional neuron could be called; "" when they could."""
    if not too_few:
        return ""
    need = f"at least {min_seqs} are needed" if min_seqs > 0 else "no number of sequences is enough"
    return (f"too few sequences per position ({n_seqs}) to call positional neurons: chance alone gives "
            f"MI up to {chance_mi:.3f}; {need}")


def stored_note(pos) -> str:
    """too_few_message from a stored positional result: analysis/positional read as a dict, or the
    HDF5 group itself; "" for results stored before the limit was recorded."""
    if "too_few" not in pos:
        return ""
    return too_few_message(bool(pos["too_few"][()]), int(pos["n_seqs"][()]), int(pos["min_seqs"][()]),
                           float(pos["chance_mi"][()]))


@dataclass
class PositionalResult:
    """Arrays over the neurons of one layer."""
    mi: np.ndarray          # (d_ffn,) float64, nats: max(mi_plugin - mi_chance, 0), compared with mi_threshold
    positional: np.ndarray  # (d_ffn,) bool
    kind: np.ndarray        # (d_ffn,) object: one of KINDS, "" where not positional
    strong: np.ndarray      # (d_ffn,) bool, False where not positional
    mi_plugin: np.ndarray   # (d_ffn,) float64, nats: the paper's formula on the observed frequencies
    mi_chance: np.ndarray   # (d_ffn,) float64: expected mi_plugin if firing did not depend on position
    mi_null: np.ndarray     # (d_ffn,) float64: the null_quantile quantile of mi_plugin under that null
    limit: CallLimit
    ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # strong oscillatory / both_extremes neuron -> [(start, end_exclusive), ...] where it fires


def mutual_information(freq_by_pos: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Plug-in I(act, pos) per neuron, in nats, for equally likely positions (App. B.1).

    freq_by_pos: (T, d) fr(pos) in [0, 1]; freq: (d,) its mean over positions. Uses 0 log 0 = 0,
    so dead (fr = 0) and always-on (fr = 1) neurons get exactly 0. Float round-off below 0 is
    clipped: MI is non-negative.
    """
    p = np.asarray(freq_by_pos, dtype=np.float64)
    q = np.asarray(freq, dtype=np.float64)[None, :]
    return np.maximum(_kl(p, q).mean(axis=0), 0.0)


def count_mutual_information(counts: np.ndarray, n_seqs: int, freq: np.ndarray) -> np.ndarray:
    """mutual_information(counts / n_seqs, freq) for integer fire counts (T, d) in [0, n_seqs], the same
    bit for bit: fr(pos) takes only n_seqs + 1 values, so where they are fewer than the positions each
    neuron's divergence is computed once per value and looked up (the logs dominate the cost)."""
    if n_seqs + 1 >= len(counts) or not np.issubdtype(counts.dtype, np.integer):
        return mutual_information(counts / n_seqs, freq)
    table = _kl(np.arange(n_seqs + 1)[:, None] / n_seqs, np.asarray(freq, dtype=np.float64)[None, :])
    width = counts.shape[1]
    kind = np.int32 if table.size < 2**31 else np.int64  # a flat index: take is 3x fancy indexing's speed
    flat = counts.astype(kind, copy=False) * kind(width) + np.arange(width, dtype=kind)
    return np.maximum(table.ravel().take(flat).mean(axis=0), 0.0)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(Bernoulli(p) || Bernoulli(q)) elementwise, 0 log 0 = 0 (q strictly inside (0, 1) where p is)."""
    # np.where evaluates both branches; the discarded one may divide by 0, hence errstate.
    with np.errstate(divide="ignore", invalid="ignore"):
        on = np.where(p > 0, p * np.log(p / q), 0.0)
        off = np.where(p < 1, (1 - p) * np.log((1 - p) / (1 - q)), 0.0)
    return on + off


# --- the chance level of the plug-in MI --------------------------------------------------------------
_EXACT_VAR = 100.0  # binomials with variance up to this are summed exactly; above, the 1/m expansion
_WINDOW = 130       # counts summed each side of the mean: > 12 sd + 10 for variance <= _EXACT_VAR
_ROWS = 2048        # rates per slice of the (rates, 2 * _WINDOW + 1) arrays
_LOG_FACT = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1.0, 21.0)))))


def _log_factorial(k: np.ndarray) -> np.ndarray:
    """log k! for integer-valued float arrays: a table below 20, Stirling's series above (error < 1e-12)."""
    x = np.maximum(k, 20.0)
    stirling = ((x + 0.5) * np.log(x) - x + 0.5 * np.log(2 * np.pi)
                + 1 / (12 * x) - 1 / (360 * x ** 3) + 1 / (1260 * x ** 5))
    return np.where(k < 20, _LOG_FACT[np.clip(k, 0, 20).astype(np.int64)], stirling)


def kl_moments(m: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of KL(k / m || q) for k ~ Binomial(m, q), per rate q (0 at q = 0 or 1).

    Exact sums over the counts within _WINDOW of the mean while m q (1 - q) <= _EXACT_VAR (the sum is
    renormalised over the window, whose outside mass is below 1e-20); above that the expansion
    mean = 1/(2m) + a/(12 m^2), variance = 1/(2 m^2) + a/(6 m^3), a = 1/(q(1-q)) - 1, whose next terms
    are below 1e-4 relative there. Each rate's result depends on that rate alone.
    """
    q = np.asarray(q, dtype=np.float64)
    mean, var = np.zeros(q.shape), np.zeros(q.shape)
    live = (q > 0) & (q < 1)
    exact = live & (m * q * (1 - q) <= _EXACT_VAR)
    big = live & ~exact
    if big.any():
        a = 1 / (q[big] * (1 - q[big])) - 1
        mean[big] = 1 / (2 * m) + a / (12 * m ** 2)
        var[big] = 1 / (2 * m ** 2) + a / (6 * m ** 3)
    idx = np.flatnonzero(exact)
    w = min(m, _WINDOW)
    offsets = np.arange(-w, w + 1, dtype=np.float64)[None, :]
    for lo in range(0, len(idx), _ROWS):
        rows = idx[lo:lo + _ROWS]
        qr = q[rows][:, None]
        k = np.rint(m * qr) + offsets
        inside = (k >= 0) & (k <= m)
        k = np.clip(k, 0, m)
        log_p = (_log_factorial(np.float64(m)) - _log_factorial(k) - _log_factorial(m - k)
                 + k * np.log(qr) + (m - k) * np.log1p(-qr))
        log_p = np.where(inside, log_p, -np.inf)
        with np.errstate(under="ignore"):  # far tails: probabilities below 1e-308 count as 0
            p = np.exp(log_p - log_p.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            d = _kl(k / m, qr)
            e = (p * d).sum(axis=1)
            mean[rows] = e
            var[rows] = (p * (d - e[:, None]) ** 2).sum(axis=1)
    return mean, var


def chance_mi(n_seqs: int, seq_len: int, freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the plug-in MI of neurons firing at rate `freq` regardless of position.

    Per position the divergence of the observed frequency from the true rate, averaged over seq_len
    positions, less the divergence of the overall observed rate from the true one (the identity
    sum_pos KL(fr(pos) || q) = sum_pos KL(fr(pos) || fr) + T KL(fr || q) makes the mean exact under
    the binomial null); its variance counts T - 1 free positions.
    """
    T, N = seq_len, n_seqs * seq_len
    per_pos, per_pos_var = kl_moments(n_seqs, freq)
    overall, _ = kl_moments(N, freq)
    return np.maximum(per_pos - overall, 0.0), per_pos_var * (T - 1) / T ** 2


def gamma_quantile(mean: np.ndarray, var: np.ndarray, level: float) -> np.ndarray:
    """The `level` quantile of a gamma distribution with this mean and variance (Wilson-Hilferty);
    the plug-in MI under the null is a sum of positive skewed terms (2 N I ~ chi-square(T - 1) for
    frequent firing, where this is that quantile)."""
    z = NormalDist().inv_cdf(level)
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(mean > 0, var / (9 * mean ** 2), 0.0)  # 1 / (9 shape)
    return mean * np.maximum(1 - h + z * np.sqrt(h), 0.0) ** 3


_RATES = np.concatenate((np.geomspace(1e-4, 0.05, 24, endpoint=False), np.linspace(0.05, 0.5, 46)))


def _callable(n_seqs: int, seq_len: int, p: PositionalParams) -> tuple[bool, float]:
    """(whether a call at p.mi_threshold is possible with n_seqs per position, worst chance MI).
    Over fire rates (the null is symmetric in q and 1 - q): chance MI below the threshold (bias), the
    null quantile within the threshold of chance (noise), and some rate at which a perfect indicator,
    with MI = min(H(rate), log T), would pass both tests."""
    mean, var = chance_mi(n_seqs, seq_len, _RATES)
    null = gamma_quantile(mean, var, p.null_quantile)
    best = np.minimum(-_RATES * np.log(_RATES) - (1 - _RATES) * np.log1p(-_RATES), np.log(seq_len))
    worst = float(mean.max())
    ok = (worst < p.mi_threshold and float((null - mean).max()) < p.mi_threshold
          and bool(((best - mean > p.mi_threshold) & (best > null)).any()))
    return ok, worst


@functools.lru_cache(maxsize=64)
def call_limit(n_seqs: int, seq_len: int, params: PositionalParams = PositionalParams()) -> CallLimit:
    """Whether n_seqs sequences per position can show positional neurons, and how many would."""
    ok, worst = _callable(n_seqs, seq_len, params)
    lo, hi = 0, 1  # bisect the fewest sequences that allow a call (more never hurt)
    while not _callable(hi, seq_len, params)[0]:
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return CallLimit(n_seqs, seq_len, -1, worst, not ok)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _callable(mid, seq_len, params)[0] else (mid, hi)
    return CallLimit(n_seqs, seq_len, hi, worst, not ok)


def positional_layer(pos_fire: np.ndarray, n_seqs: int,
                     params: PositionalParams = PositionalParams()) -> PositionalResult:
    """Find and type the positional neurons of one layer.

    pos_fire: (seq_len, d_ffn) integer, how many of the n_seqs full-length sequences fired each
    neuron at each position. MI is vectorised over slices of neurons, the chance level over the
    distinct fire counts; the per-neuron typing loop runs only over the (few) positional neurons.
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
    fires = pos_fire.sum(axis=0, dtype=np.int64)
    freq = fires / (n_seqs * seq_len)
    mi_plugin = np.empty(d, dtype=np.float64)
    for lo in range(0, d, _CHUNK):
        hi = min(lo + _CHUNK, d)
        mi_plugin[lo:hi] = count_mutual_information(pos_fire[:, lo:hi], n_seqs, freq[lo:hi])
    counts, which = np.unique(fires, return_inverse=True)  # the chance level depends on the fire count only
    mean, var = chance_mi(n_seqs, seq_len, counts / (n_seqs * seq_len))
    mi_chance = mean[which.reshape(-1)]
    mi_null = gamma_quantile(mean, var, params.null_quantile)[which.reshape(-1)]
    mi = np.maximum(mi_plugin - mi_chance, 0.0)
    limit = call_limit(int(n_seqs), int(seq_len), params)

    positional = (mi > params.mi_threshold) & (mi_plugin > mi_null) & (not limit.too_few)
    kind = np.full(d, "", dtype=object)
    strong = np.zeros(d, dtype=bool)
    ranges: dict[int, list[tuple[int, int]]] = {}
    for n in np.flatnonzero(positional):
        k, s, on_runs = _classify(pos_fire[:, n].astype(np.int64), n_seqs, params)
        kind[n], strong[n] = k, s
        if s and k in ("oscillatory", "both_extremes"):
            ranges[int(n)] = on_runs
    return PositionalResult(mi=mi, positional=positional, kind=kind, strong=strong, mi_plugin=mi_plugin,
                            mi_chance=mi_chance, mi_null=mi_null, limit=limit, ranges=ranges)


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
