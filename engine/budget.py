"""Memory plans: how many layers stay on the device, and how much host memory hidden states may take."""
from __future__ import annotations

import torch

from ffnscope.cache.errors import UserError
from ffnscope.engine.layer_runner import param_bytes
from ffnscope.engine.units import human

def plan_device(budget: int | None, lm, device: torch.device, batch_tokens: int) -> int:
    """Number of leading layers kept resident; the rest stream through one device slot."""
    layers = list(lm.adapter.layers)
    per_layer = max(param_bytes(layer) for layer in layers)
    fixed = param_bytes(lm.adapter.base) - sum(param_bytes(layer) for layer in layers)
    if budget is None:
        if device.type != "cuda":
            return len(layers)
        free, _total = torch.cuda.mem_get_info(device)
        d_model = lm.model.get_input_embeddings().weight.shape[1]
        workspace = batch_tokens * (8 * lm.adapter.d_ffn + 16 * d_model) * 4
        budget = int(free * 0.9) - workspace
    room = budget - fixed
    if room < per_layer:
        raise UserError(f"--device-memory {human(budget)} does not hold the embeddings and one layer "
                        f"({human(fixed + per_layer)}); raise it")
    fit = room // per_layer
    return len(layers) if fit >= len(layers) else int(fit) - 1


RUNTIME_BYTES = 1 << 30  # interpreter, torch, transformers, numba's compiled kernels


def batch_workspace(lm, meta: dict, batch_tokens: int) -> int:
    """Bytes one forward batch of one layer needs: CPU attention materializes its score matrix."""
    config, seq_len = lm.config, meta["data"]["seq_len"]
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    seqs = max(1, batch_tokens // seq_len)
    tokens = seqs * seq_len
    return 4 * (seqs * heads * seq_len * seq_len + tokens * (6 * meta["model"]["d_ffn"] + 12 * meta["model"]["d_model"]))


def host_fixed_bytes(lm, meta: dict) -> int:
    """Host memory a recording needs besides the shard's hidden states."""
    rec, model = meta["recording"], meta["model"]
    n_layers = len(rec["layers"])
    state = n_layers * model["d_ffn"] * (meta["data"]["seq_len"] * 4 + rec["topk"] * 12 + 64)
    one_layer = state // max(n_layers, 1) * 3  # a layer's accumulators in flight (int64 positions)
    samples = rec["samples"] * n_layers * model["d_ffn"] * 2
    weights = param_bytes(lm.model)
    return (weights + state + one_layer + 2 * samples + RUNTIME_BYTES
            + batch_workspace(lm, meta, rec["batch_tokens"]))


def plan_host(budget: int | None, lm, meta: dict) -> int:
    """Bytes the shard's hidden states may take in RAM before they go to a memory-mapped file."""
    if budget is None:
        return 1 << 62
    room = budget - host_fixed_bytes(lm, meta)
    if room <= 0:
        raise UserError(f"--host-memory {human(budget)} is below the model weights and statistics "
                        f"({human(budget - room)}); raise it")
    return room
