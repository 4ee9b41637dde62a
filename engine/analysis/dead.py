"""Dead neurons and firing frequency per layer (Voita et al. 2023, Sec. 3, Fig. 1). Numpy only."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache.reader import CacheReader


@dataclass
class LayerFiring:
    layer: int
    d_ffn: int
    dead_fraction: dict[float, float]   # per recorded tau: neurons that never fired
    alive_freq: float                   # mean firing frequency of alive neurons, primary tau

    def dead(self, tau: float) -> float:
        return self.dead_fraction[tau]


def firing_by_layer(reader: CacheReader) -> list[LayerFiring]:
    rec = reader.meta["recording"]
    taus, primary = rec["taus"], rec["primary_index"]
    n_tokens = max(reader.n_tokens, 1)
    rows = []
    for layer in reader.layers:
        counts = reader.array(layer, "fire_count")          # (n_taus, d_ffn)
        dead = {tau: float(np.mean(counts[i] == 0)) for i, tau in enumerate(taus)}
        alive = counts[primary][counts[primary] > 0]
        freq = float(alive.mean() / n_tokens) if alive.size else 0.0
        rows.append(LayerFiring(layer, counts.shape[1], dead, freq))
    return rows
