"""Reference statistics from a plain, batch-major forward of the whole model: what the layer-major
recorder must reproduce."""
from __future__ import annotations

import numpy as np
import torch

from ffnscope.engine.model.sites import Adapter

SUMMED = ("fire_count", "g_sum", "pos_fire", "token_fires", "token_g")   # add over parts of the data
PER_SEQUENCE = ("seq_act", "seq_pos", "seq_g", "start_act", "start_g")   # (sequences, d_ffn), concatenate


@torch.no_grad()
def reference_stats(model, tokens: np.ndarray, taus: list[float], primary: int) -> dict[int, dict]:
    adapter = Adapter(model)
    captured: dict[int, dict] = {i: {} for i in range(len(adapter.layers))}
    handles = []
    for i, layer in enumerate(adapter.layers):
        handles.append(adapter.down_module(layer).register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].__setitem__("g", args[0])))
        if adapter.gated:
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
        vocab, d = adapter.model.config.vocab_size, g.shape[1]
        token_fires = np.zeros((vocab, d), np.int64)
        token_g = np.zeros((vocab, d), np.float64)
        flat = tokens.reshape(-1)
        not_start = np.tile(np.arange(seq_len) >= 1, n)
        fires_np, g_np = fires.numpy(), g.numpy().astype(np.float64)
        np.add.at(token_fires, flat[not_start], fires_np[not_start].astype(np.int64))
        np.add.at(token_g, flat[not_start], np.where(fires_np, g_np, 0.0)[not_start])
        # each sequence's strongest position >= 1 by act (the first on ties), and position 0 apart
        a3, g3 = act.numpy().reshape(n, seq_len, d), g.numpy().reshape(n, seq_len, d)
        seq_pos = a3[:, 1:].argmax(1) + 1
        out[i] = {
            "fire_count": np.stack([(act > t).sum(0).numpy() for t in taus]),
            "g_sum": g.double().sum(0).numpy(),
            "g_max": g.max(0).values.numpy(),
            "pos_fire": fires.reshape(n, seq_len, -1).sum(0).numpy(),
            "token_fires": token_fires,
            "token_g": token_g,
            "seq_act": np.take_along_axis(a3, seq_pos[:, None], 1)[:, 0],
            "seq_pos": seq_pos,
            "seq_g": np.take_along_axis(g3, seq_pos[:, None], 1)[:, 0],
            "start_act": a3[:, 0],
            "start_g": g3[:, 0],
        }
    return out


def combine(parts: list[dict]) -> dict:
    """One layer's reference statistics of consecutive parts of the data (in order), as one."""
    out = {k: sum(p[k] for p in parts) for k in SUMMED}
    out["g_max"] = np.max([p["g_max"] for p in parts], 0)
    out.update({k: np.concatenate([p[k] for p in parts]) for k in PER_SEQUENCE})
    return out


def top_contexts(ref: dict, seq_len: int, k: int, first_seq: int = 0) -> dict[str, np.ndarray]:
    """The contexts a recording keeps, by their definition: per neuron the k sequences whose strongest
    act at positions >= 1 is largest (ties: the smaller token index), with that act, its global token
    index and g there; and apart, the largest act at position 0 of any sequence (same tie rule)."""
    n, d = ref["seq_act"].shape
    seq_start = (first_seq + np.arange(n)) * seq_len
    out = {name: [] for name in ("topk_value", "topk_index", "topk_g", "start_value", "start_index", "start_g")}
    for j in range(d):
        index = seq_start + ref["seq_pos"][:, j]
        best = sorted(range(n), key=lambda s: (-ref["seq_act"][s, j], index[s]))[:k]
        out["topk_value"].append(ref["seq_act"][best, j])
        out["topk_index"].append(index[best])
        out["topk_g"].append(ref["seq_g"][best, j])
        s = min(range(n), key=lambda s: (-ref["start_act"][s, j], s))
        out["start_value"].append(ref["start_act"][s, j])
        out["start_index"].append(seq_start[s])
        out["start_g"].append(ref["start_g"][s, j])
    return {name: np.stack(v, axis=-1) for name, v in out.items()}
