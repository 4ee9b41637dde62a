"""Dead neurons and firing frequency per layer (Voita et al. 2023, Sec. 3, Fig. 1). Numpy only.

Two notions of dead, always reported side by side:
- the paper's: never activated, act > 0 on no token (fire count 0 at tau = 0; for ReLU that is
  "never non-zero", for SiLU/GELU silu(x) > 0 exactly when x > 0);
- the recording's firing rule (its primary threshold): never above tau, which for smooth
  activations at tau = 1 is a stricter notion: such a neuron may be active, weakly, everywhere.
A relative rule (`record --tau-rule`) gives each layer its own threshold tau_l; the labels here say
which rule a figure uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ffnscope.cache.provenance import RecordingInfo
from ffnscope.cache.reader import CacheReader

PAPER_DEAD = "never activated (act > 0 nowhere: the paper's dead)"
RULE_NAMES = {"quantile": "quantile of act over the layer's neurons and calibration tokens",
              "median-max": "x the median over the layer's neurons of each one's max act on the calibration tokens"}


def describe_rule(rule: str) -> str:
    """'quantile:0.99' -> 'tau_l = 0.99 quantile of act over ...'."""
    if rule == "absolute":
        return "absolute tau"
    kind, _, value = rule.partition(":")
    return f"tau_l = {value} {RULE_NAMES.get(kind, kind)}"


def rule_short(rec: RecordingInfo) -> str:
    """A few characters for headers: 'τ=1', or 'τ_l q0.99' for a relative rule."""
    if not rec.is_relative:
        return f"τ={rec.primary_tau:g}"
    kind, _, value = rec.tau_rule.partition(":")
    return f"τ_l {'q' if kind == 'quantile' else 'max×'}{value}"


def primary_is_tau0(rec: RecordingInfo) -> bool:
    """The firing rule is the paper's own (absolute tau = 0): one notion of dead, not two."""
    return not rec.is_relative and rec.primary_tau == 0.0


def dead_label(rec: RecordingInfo) -> str:
    """What 'dead' at the recording's firing rule means, in words."""
    if primary_is_tau0(rec):
        return PAPER_DEAD
    if rec.is_relative:
        return f"never above its layer's threshold ({describe_rule(rec.tau_rule)})"
    return f"never above τ={rec.primary_tau:g} (stricter than the paper's never activated)"


@dataclass
class LayerFiring:
    layer: int
    d_ffn: int
    tau: float                          # this layer's primary threshold
    dead_fraction: dict[float, float]   # per recorded absolute tau: neurons that never fired above it
    dead_primary: float                 # never fired at the primary rule (tau, or the layer's tau_l)
    dead_tau0: float                    # never activated at all (the paper's dead)
    alive_freq: float                   # mean firing frequency of alive neurons, primary rule (NaN: none alive)
    dead_sq_share: float                # share of the layer's sum of g^2 carried by its primary-dead neurons
                                        # (NaN where g is 0 everywhere)

    def dead(self, tau: float) -> float:
        return self.dead_fraction[tau]


def firing_by_layer(reader: CacheReader) -> list[LayerFiring]:
    rec = reader.provenance.recording
    taus, primary, zero = rec.taus, rec.primary_index, rec.tau0_index
    n_tokens = max(reader.n_tokens, 1)
    rows = []
    for layer in reader.layers:
        counts = reader.array(layer, "fire_count")          # (n_rows, d_ffn); row primary may follow taus
        dead = {tau: float(np.mean(counts[i] == 0)) for i, tau in enumerate(taus)}
        never = counts[primary] == 0
        alive = counts[primary][~never]
        freq = float(alive.mean() / n_tokens) if alive.size else float("nan")  # no alive neuron: not known
        sumsq = reader.array(layer, "g_sumsq")
        total = float(sumsq.sum())
        share = float(sumsq[never].sum() / total) if total > 0 else float("nan")  # g is 0 everywhere: 0 / 0
        rows.append(LayerFiring(layer, counts.shape[1], rec.layer_tau(layer), dead, float(never.mean()),
                                float(np.mean(counts[zero] == 0)), freq, share))
    return rows
