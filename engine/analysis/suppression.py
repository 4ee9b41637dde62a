"""Token suppression by detector updates (Voita et al. 2023, Sec. 4.4, Fig. 5-6).

When neuron i fires, the FFN adds g_i * W_out[i] to the residual stream. Projected onto the
vocabulary through the final norm's scale, that update promotes the tokens with the largest
logits and suppresses those with the most negative ones.

Update direction. For ReLU models g > 0 wherever a neuron fires. For gated FFNs g = act(gate) * up
has the sign of `up`, which firing (act(gate) > tau) says nothing about, so the direction of a
token detector's update is sign(G) x W_out[i], with G the sum of g over the firings on its trigger
tokens (recorded per (token, neuron) pair). The sign of g's mean over all tokens would be wrong:
most tokens are not firings, and their g can outweigh those that are.

Two readings, each with its score and verdict. Both use the same logit contributions of the update
(one row of `project`), so they differ only in what the triggers are compared with:
- `trigger_logit` (the paper's reading): the mean logit contribution of the update on the trigger
  tokens; `suppresses_logit` iff it is < 0. Voita et al. Sec. 4.4 count a detector whose update
  "points in the negative direction from the triggering tokens" (">80 %" of token detectors).
- `trigger_logit_z`: the same mean as a z-score against the contributions on the whole vocabulary
  (their mean and standard deviation); `suppresses_z` iff it is < 0: the update pushes its triggers
  below the vocabulary's average.
Both are kept because they disagree where the update moves the whole vocabulary one way: a row that
lowers every token lowers the triggers too (negative raw logit) yet may lower them less than the rest
(positive z), and the reverse. The raw reading is the paper's; the z-score says whether the triggers
are singled out (the output softmax ignores a shift of every logit alike). Each flag is exactly the
sign of its stored score.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.cache.state import Sparse


@dataclass(frozen=True)
class SuppressionParams:
    top: int = 10  # promoted / suppressed tokens kept per detector

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SuppressionResult:
    neuron: np.ndarray           # (m,) int32 the layer's token detectors
    promoted: np.ndarray         # (m, top) int64 token ids, most promoted first
    promoted_score: np.ndarray   # (m, top) float32 logit contributions of sign(trigger_g) * W_out[i]
    suppressed: np.ndarray       # (m, top) int64, most suppressed first
    suppressed_score: np.ndarray
    trigger_g: np.ndarray        # (m,) float32 mean g at the firings on the triggers: its sign is the update's
    trigger_logit: np.ndarray    # (m,) float32 the triggers' mean logit contribution (the paper's reading)
    trigger_logit_z: np.ndarray  # (m,) float32 the same as a z-score against the whole vocabulary
    trigger_rank: np.ndarray     # (m,) float32 mean rank percentile of triggers (0 = most suppressed)
    suppresses_logit: np.ndarray  # (m,) bool: trigger_logit < 0
    suppresses_z: np.ndarray      # (m,) bool: trigger_logit_z < 0


def project(rows: np.ndarray, norm_scale: np.ndarray | None, unembedding: np.ndarray) -> np.ndarray:
    """(m, d_model) update directions -> (m, vocab) logit contributions."""
    if norm_scale is not None:
        rows = rows * norm_scale
    return rows @ unembedding.T


def trigger_g(unigrams: Sparse, neurons: np.ndarray, triggers: list[np.ndarray], d_ffn: int) -> np.ndarray:
    """Mean g over each detector's firings on its trigger tokens, from the recorded (token, neuron)
    fire counts and g sums (cache layers/NNN/ngram1). NaN where none is recorded."""
    if unigrams.g_sum is None:
        raise UserError("the recording holds no sums of g at token firings, which suppression needs; record it again")
    key = unigrams.gram.astype(np.int64) * d_ffn + unigrams.neuron   # ascending: sorted by gram, then neuron
    out = np.full(len(neurons), np.nan, np.float32)
    for row, (neuron, tokens) in enumerate(zip(neurons, triggers)):
        want = np.asarray(tokens, np.int64) * d_ffn + int(neuron)
        at = np.searchsorted(key, want)
        at = at[(at < len(key)) & (key[np.minimum(at, len(key) - 1)] == want)]
        fires = unigrams.count[at].sum()
        if fires:
            out[row] = unigrams.g_sum[at].sum() / fires
    return out


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest values per row, largest first."""
    k = min(k, values.shape[1])
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(values, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def suppression_layer(neurons: np.ndarray, triggers: list[np.ndarray], rows: np.ndarray, g_at_triggers: np.ndarray,
                      norm_scale, unembedding: np.ndarray, params: SuppressionParams = SuppressionParams(),
                      chunk: int = 256) -> SuppressionResult:
    """neurons (m,), their trigger token ids, their W_out rows (m, d_model) and the mean g at their
    triggers' firings (m,), whose sign gives each update's direction (+ where unknown).
    Works through the detectors `chunk` at a time: never an (all detectors x vocabulary) array. The
    projection is float64 (rows x signs is); a float32 unembedding is cast here once, not in each chunk's
    product, where numpy casts it again each time (pass it as float64 to cast it once for all layers)."""
    m, top = len(neurons), params.top
    unembedding = np.asarray(unembedding, np.float64)
    signs = np.where(np.asarray(g_at_triggers) < 0, -1.0, 1.0)
    promoted = np.zeros((m, top), np.int64)
    suppressed = np.zeros((m, top), np.int64)
    promoted_score = np.zeros((m, top), np.float32)
    suppressed_score = np.zeros((m, top), np.float32)
    raw, score, rank = np.zeros(m, np.float32), np.zeros(m, np.float32), np.zeros(m, np.float32)
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        logits = project(rows[lo:hi] * signs[lo:hi, None], norm_scale, unembedding).astype(np.float32)
        promoted[lo:hi] = _top(logits, top)
        suppressed[lo:hi] = _top(-logits, top)
        promoted_score[lo:hi] = np.take_along_axis(logits, promoted[lo:hi], 1)
        suppressed_score[lo:hi] = np.take_along_axis(logits, suppressed[lo:hi], 1)
        for row, values in enumerate(logits, start=lo):
            trig = values[triggers[row]]
            raw[row] = trig.mean()
            score[row] = (raw[row] - values.mean()) / (values.std() + 1e-12)
            rank[row] = np.mean([(values < v).sum() for v in trig]) / max(len(values) - 1, 1)
    return SuppressionResult(neurons.astype(np.int32), promoted, promoted_score, suppressed, suppressed_score,
                             np.asarray(g_at_triggers, np.float32), raw, score, rank, raw < 0, score < 0)
