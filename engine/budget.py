"""Memory plans: how many layers stay on the device, and how much host memory hidden states may take."""
from __future__ import annotations

import torch

from cache.errors import UserError
from engine.layer_runner import param_bytes
from engine.units import human

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


def plan_host(budget: int | None, lm, meta: dict) -> int:
    """Bytes the shard's hidden states may take in RAM before they go to a memory-mapped file."""
    if budget is None:
        return 1 << 62
    rec, model = meta["recording"], meta["model"]
    n_layers = len(rec["layers"])
    state = n_layers * model["d_ffn"] * (meta["data"]["seq_len"] * 4 + rec["topk"] * 12 + 64)
    samples = rec["samples"] * n_layers * model["d_ffn"] * 2
    weights = param_bytes(lm.model)
    room = budget - weights - 2 * state - 2 * samples - (512 << 20)  # interpreter, libraries
    if room <= 0:
        raise UserError(f"--host-memory {human(budget)} is below the model weights and statistics "
                        f"({human(budget - room)}); raise it")
    return room
