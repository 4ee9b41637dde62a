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


def suppression_layer(neurons: np.ndarray, triggers: list[np.ndarray], rows: np.ndarray, signs: np.ndarray,
                      norm_scale, unembedding: np.ndarray, params: SuppressionParams = SuppressionParams()
                      ) -> SuppressionResult:
    """neurons (m,), their trigger token ids, their W_out rows (m, d_model) and update signs (m,)."""
    m, top = len(neurons), params.top
    logits = project(rows * signs[:, None], norm_scale, unembedding).astype(np.float32) if m else \
        np.zeros((0, unembedding.shape[0]), np.float32)
    order = np.argsort(-logits, axis=1, kind="stable")
    promoted, suppressed = order[:, :top], order[:, ::-1][:, :top]
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order[:, ::-1], np.arange(logits.shape[1])[None, :].repeat(m, 0), axis=1)
    score = np.zeros(m, np.float32)
    rank = np.zeros(m, np.float32)
    for row, tokens in enumerate(triggers):
        values = logits[row]
        score[row] = (values[tokens].mean() - values.mean()) / (values.std() + 1e-12)
        rank[row] = ranks[row, tokens].mean() / max(len(values) - 1, 1)
    mean_trigger = np.array([logits[r, t].mean() if len(t) else 0.0 for r, t in enumerate(triggers)], np.float32)
    return SuppressionResult(neurons.astype(np.int32), promoted, np.take_along_axis(logits, promoted, 1),
                             suppressed, np.take_along_axis(logits, suppressed, 1), score, rank,
                             mean_trigger < 0)


def params_dict(params: SuppressionParams) -> dict:
    return asdict(params)
