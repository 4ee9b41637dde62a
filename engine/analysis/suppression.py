"""Token suppression by detector updates (Voita et al. 2023, Sec. 4.4, Fig. 5-6).

When neuron i fires, the FFN adds g_i * W_out[i] to the residual stream. Projected onto the
vocabulary through the final norm's scale, that update promotes the tokens with the largest
logits and suppresses those with the most negative ones. A detector suppresses its triggers when
the update points away from them: the mean projection of its trigger tokens is negative.

For ReLU models g >= 0 when a neuron fires. For gated FFNs g = act(gate) * up can have either
sign; we take the sign of the neuron's mean g (its fires dominate it for the rare neurons that are
detectors) as the direction of its update.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SuppressionParams:
    top: int = 10  # promoted / suppressed tokens kept per detector

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SuppressionResult:
    neuron: np.ndarray          # (m,) int32 the layer's token detectors
    promoted: np.ndarray        # (m, top) int64 token ids, most promoted first
    promoted_score: np.ndarray  # (m, top) float32
    suppressed: np.ndarray      # (m, top) int64, most suppressed first
    suppressed_score: np.ndarray
    trigger_score: np.ndarray   # (m,) float32 mean projection of the triggers, in std units of the row
    trigger_rank: np.ndarray    # (m,) float32 mean rank percentile of triggers (0 = most suppressed)
    suppresses: np.ndarray      # (m,) bool


def project(rows: np.ndarray, norm_scale: np.ndarray | None, unembedding: np.ndarray) -> np.ndarray:
    """(m, d_model) update directions -> (m, vocab) logit contributions."""
    if norm_scale is not None:
        rows = rows * norm_scale
    return rows @ unembedding.T


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest values per row, largest first."""
    k = min(k, values.shape[1])
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(values, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def suppression_layer(neurons: np.ndarray, triggers: list[np.ndarray], rows: np.ndarray, signs: np.ndarray,
                      norm_scale, unembedding: np.ndarray, params: SuppressionParams = SuppressionParams(),
                      chunk: int = 256) -> SuppressionResult:
    """neurons (m,), their trigger token ids, their W_out rows (m, d_model) and update signs (m,).
    Works through the detectors `chunk` at a time: never an (all detectors x vocabulary) array."""
    m, top = len(neurons), params.top
    promoted = np.zeros((m, top), np.int64)
    suppressed = np.zeros((m, top), np.int64)
    promoted_score = np.zeros((m, top), np.float32)
    suppressed_score = np.zeros((m, top), np.float32)
    score, rank, mean = (np.zeros(m, np.float32) for _ in range(3))
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        logits = project(rows[lo:hi] * signs[lo:hi, None], norm_scale, unembedding).astype(np.float32)
        promoted[lo:hi] = _top(logits, top)
        suppressed[lo:hi] = _top(-logits, top)
        promoted_score[lo:hi] = np.take_along_axis(logits, promoted[lo:hi], 1)
        suppressed_score[lo:hi] = np.take_along_axis(logits, suppressed[lo:hi], 1)
        for row, values in enumerate(logits, start=lo):
            trig = values[triggers[row]]
            mean[row] = trig.mean()
            score[row] = (mean[row] - values.mean()) / (values.std() + 1e-12)
            rank[row] = np.mean([(values < v).sum() for v in trig]) / max(len(values) - 1, 1)
    return SuppressionResult(neurons.astype(np.int32), promoted, promoted_score, suppressed, suppressed_score,
                             score, rank, mean < 0)
