"""Reference statistics from a plain, batch-major forward of the whole model: what the layer-major
recorder must reproduce."""
from __future__ import annotations

import numpy as np
import torch

from engine.adapters import Adapter


@torch.no_grad()
def reference_stats(model, tokens: np.ndarray, taus: list[float], primary: int) -> dict[int, dict]:
    adapter = Adapter(model)
    captured: dict[int, dict] = {i: {} for i in range(len(adapter.layers))}
    handles = []
    for i, layer in enumerate(adapter.layers):
        handles.append(adapter.down_module(layer).register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].__setitem__("g", args[0])))
        if adapter.family.gated:
            handles.append(adapter.act_module(layer).register_forward_hook(
                lambda _m, _a, out, i=i: captured[i].__setitem__("act", out)))
    try:
        adapter.base(input_ids=torch.as_tensor(tokens, dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n, seq_len = tokens.shape
    out = {}
    for i, c in captured.items():
        g = c["g"].reshape(n * seq_len, -1).float()
        act = c.get("act", c["g"]).reshape(n * seq_len, -1).float()
        fires = act > taus[primary]
        token_fires = np.zeros((adapter.model.config.vocab_size, g.shape[1]), np.int64)
        flat = tokens.reshape(-1)
        not_start = np.tile(np.arange(seq_len) >= 1, n)
        np.add.at(token_fires, flat[not_start], fires.numpy()[not_start].astype(np.int64))
        out[i] = {
            "fire_count": np.stack([(act > t).sum(0).numpy() for t in taus]),
            "g_sum": g.double().sum(0).numpy(),
            "g_max": g.max(0).values.numpy(),
            "pos_fire": fires.reshape(n, seq_len, -1).sum(0).numpy(),
            "token_fires": token_fires,
        }
    return out
