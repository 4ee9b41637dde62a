"""Device and memory plans: which device, how many layers stay on it, how much host memory hidden states
may take, and giving freed heap back to the OS."""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

from ffnscope.cache.errors import UserError
from ffnscope.engine.model.runner import param_bytes
from ffnscope.engine.units import human


def layer_sizes(lm) -> tuple[int, int]:
    """(bytes of the weights outside the decoder layers, bytes of the largest layer); meta tensors count."""
    layers = list(lm.adapter.layers)
    fixed = param_bytes(lm.model) - sum(param_bytes(layer) for layer in layers)
    return fixed, max(param_bytes(layer) for layer in layers)


def plan_device(budget: int | None, lm, device: torch.device, batch_tokens: int) -> int:
    """Number of leading layers kept resident; the rest stream through one device slot. Remembers on `lm`
    how many layers that keeps in host memory, for plan_host."""
    resident = _plan_device(budget, lm, device, batch_tokens)
    lm.host_layers = resident if device.type == "cpu" else 0
    return resident


def _plan_device(budget: int | None, lm, device: torch.device, batch_tokens: int) -> int:
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


def held_weight_bytes(lm, host_layers: int | None = None) -> int:
    """Weight bytes a recording holds in host memory. A model loaded whole: all of them. One read per
    layer (lm.weights): the non-layer weights, the `host_layers` layers kept resident on the host
    (default: plan_device's choice, else all) and one more layer being read."""
    if getattr(lm, "weights", None) is None:
        return param_bytes(lm.model)
    n = len(lm.adapter.layers)
    held = getattr(lm, "host_layers", None) if host_layers is None else host_layers
    fixed, per_layer = layer_sizes(lm)
    return fixed + min(n, (n if held is None else held) + 1) * per_layer


def host_fixed_bytes(lm, meta: dict, host_layers: int | None = None) -> int:
    """Host memory a recording needs besides the shard's hidden states."""
    rec, model = meta["recording"], meta["model"]
    n_layers = len(rec["layers"])
    state = n_layers * model["d_ffn"] * (meta["data"]["seq_len"] * 4 + rec["topk"] * 12 + 64)
    one_layer = state // max(n_layers, 1) * 3  # a layer's accumulators in flight (int64 positions)
    samples = rec["samples"] * n_layers * model["d_ffn"] * 2
    return (held_weight_bytes(lm, host_layers) + state + one_layer + 2 * samples + RUNTIME_BYTES
            + batch_workspace(lm, meta, rec["batch_tokens"]))


def plan_host(budget: int | None, lm, meta: dict) -> int:
    """Bytes the shard's hidden states may take in RAM before they go to a memory-mapped file."""
    if budget is None:
        return 1 << 62
    room = budget - host_fixed_bytes(lm, meta)
    if room <= 0:
        hint = ("" if getattr(lm, "weights", None) is None or lm.host_layers == 0
                else " (or keep fewer layers in memory with --device-memory)")
        raise UserError(f"--host-memory {human(budget)} is below the weights held and statistics "
                        f"({human(budget - room)}); raise it{hint}")
    return room


def plan_memory(device_budget: int | None, host_budget: int | None, lm, meta: dict, device: torch.device,
                batch_tokens: int) -> tuple[int, int]:
    """-> (resident layers, hidden-state bytes): plan_device then plan_host, except on the CPU with a host
    budget and no device budget, where the layers kept resident are those the host budget leaves room for
    after one shard's hidden states (the device is the host)."""
    if device.type == "cpu" and device_budget is None and host_budget is not None \
            and getattr(lm, "weights", None) is not None:
        _fixed, per_layer = layer_sizes(lm)
        on_device = param_bytes(lm.adapter.base) - sum(param_bytes(layer) for layer in lm.adapter.layers)
        hidden = meta["recording"]["shard_tokens"] * meta["model"]["d_model"] * 4
        # all the host holds but the base model's own weights (plan_device's part), one shard's hidden states in
        others = host_fixed_bytes(lm, meta, host_layers=0) - per_layer - on_device + hidden
        device_budget = max(host_budget - others, on_device + per_layer)  # too small: plan_host says so
    resident = plan_device(device_budget, lm, device, batch_tokens)
    return resident, plan_host(host_budget, lm, meta)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but this torch sees no CUDA GPU; use --device cpu")
    return device


_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim  # glibc only
except (OSError, AttributeError):
    _libc = None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. Each layer frees hundreds of MB of batch buffers;
    glibc keeps them otherwise, and the process's footprint creeps past the budget it planned."""
    if _libc is not None:
        _libc.malloc_trim(0)
