"""Reference statistics from a plain, batch-major forward of the whole model: what the layer-major
recorder must reproduce.

The reference finds each layer's FFN on its own, from what the model computes, never from the FFN
locator's choice of modules (engine/model/sites.py), so a wrongly located site differs from it: every
leaf module is hooked for one forward, with no look at module names, and

  - the output projection of layer l is the l-th call, in the order of the forward, of a leaf module
    holding a 2-D weight that maps a width other than d_model (the embeddings' width) to d_model, its
    input of the width the weight's other side has (a linear map into the residual stream: attention
    projections in the sweep's configurations are d_model wide, so they are not taken); where that
    gives more calls than layers, the ones whose input is not computed as an FFN's (below) are dropped;
  - g is that call's input; the FFN is plain when g is the output of a parameter-free leaf module (its
    activation, or a dropout after it) or, with no such module, when exactly one linear map of the
    layer produces g's width (an activation applied as a function): neurons fire on g; it is gated when
    g = a * u for the output a of a parameter-free leaf module whose input is a projection's output (or
    a half of a fused one) and a tensor u the layer computed: neurons fire on a = act(gate).

Anything else raises NotFound (the reference cannot check that architecture). tests/arch_sweep.py
checks the site further by what the model does: the output projection's output equals
g @ W_out + bias with the locator's W_out, and zeroing one neuron at the reference's site changes the
model's outputs exactly as subtracting g_i times the locator's row i of W_out from the FFN output does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SUMMED = ("fire_count", "g_sum", "g_sumsq", "pos_fire", "token_fires", "token_g")   # add over parts of the data
PER_SEQUENCE = ("seq_act", "seq_pos", "seq_g", "start_act", "start_g")   # (sequences, d_ffn), concatenate
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class NotFound(Exception):
    """The reference cannot find a layer's FFN from what the model computes."""


@dataclass
class Site:
    """One layer's FFN as the reference finds it, on one batch."""
    name: str              # the output projection's qualified name (for messages only)
    module: nn.Module      # the output projection
    g: torch.Tensor        # (tokens, d_ffn) its input
    act: torch.Tensor      # (tokens, d_ffn) what fires: act(gate) for a gated FFN, g for a plain one
    gated: bool
    out: torch.Tensor      # (tokens, d_model) its output


@dataclass
class _Call:
    name: str
    module: nn.Module
    x: torch.Tensor | None
    y: torch.Tensor | None


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _linear_like(call: _Call) -> bool:
    weight = getattr(call.module, "weight", None)
    x, y = call.x, call.y
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and x is not None and y is not None
            and x.is_floating_point() and y.is_floating_point()):
        return False
    return sorted(weight.shape) == sorted((x.shape[-1], y.shape[-1]))


@torch.no_grad()
def leaf_calls(model: nn.Module, input_ids: torch.Tensor) -> list[_Call]:
    """Every call of a leaf module (one without submodules) in one forward, in order, with (a copy of) its
    first tensor input and first tensor output."""
    calls: list[_Call] = []
    handles = []

    def hook(name):
        def on_call(module, args, kwargs, output):
            x = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
            y = _first_tensor(output)
            # copies: a model may change a module's output in place afterwards (Falcon adds attention to it)
            calls.append(_Call(name, module, None if x is None else x.clone(), None if y is None else y.clone()))
        return on_call

    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _n_layers(config) -> int | None:
    for key in LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pieces(y: torch.Tensor, shape) -> list[torch.Tensor]:
    """y itself where it has g's shape; the halves (and even/odd columns) of a twice-as-wide output."""
    if y is None or not y.is_floating_point() or tuple(y.shape[:-1]) != tuple(shape[:-1]):
        return []
    if y.shape[-1] == shape[-1]:
        return [y]
    if y.shape[-1] == 2 * shape[-1]:
        a, b = y.chunk(2, dim=-1)
        return [a, b, y[..., 0::2], y[..., 1::2]]
    return []


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (torch.equal(a, b) or bool(torch.allclose(a, b, rtol=1e-6, atol=1e-7)))


def _classify(window: list[_Call], g: torch.Tensor) -> tuple[bool, torch.Tensor] | None:
    """(gated, what fires) for the FFN whose output projection's input is g, from the calls of its layer
    before it; None where g is not computed as an FFN's."""
    free = [c for c in window if not _has_params(c.module) and c.y is not None and c.y.shape == g.shape]
    if any(torch.equal(c.y, g) for c in free):
        return False, g
    projections = [p for c in window if _linear_like(c) for p in _pieces(c.y, g.shape)]
    tensors = [p for c in window for p in _pieces(c.y, g.shape)]
    acts = []
    for c in free:
        if c.x is None or not any(_same(c.x, p) for p in projections):
            continue  # not an activation of a projection (the gate)
        if any(u is not c.y and _same(c.y * u, g) for u in tensors):
            acts.append(c.y)
    if acts and all(torch.equal(a, acts[0]) for a in acts):
        return True, acts[0]
    if not acts and not free and len(projections) == 1:
        return False, g  # one projection of g's width, an activation applied as a function
    return None


@torch.no_grad()
def find_ffn(model: nn.Module, input_ids: torch.Tensor) -> list[Site]:
    """Each decoder layer's FFN, found from what one forward computes (see the module docstring)."""
    calls = leaf_calls(model, input_ids)
    d_model = model.get_input_embeddings().weight.shape[-1]
    downs = [i for i, c in enumerate(calls)
             if _linear_like(c) and c.y.shape[-1] == d_model and c.x.shape[-1] != d_model]
    n = _n_layers(model.config)

    def classified(indices):
        out, previous = [], -1
        for i in indices:
            out.append((i, _classify(calls[previous + 1:i], calls[i].x)))
            previous = i
        return out

    found = classified(downs)
    if n is not None and len(downs) != n:
        found = classified([i for i, kind in found if kind is not None])
    if n is not None and len(found) != n:
        raise NotFound(f"{len(found)} calls of a linear map from a width other than d_model={d_model} into it "
                       f"({', '.join(calls[i].name for i, _ in found) or 'none'}), not one per layer ({n})")
    sites = []
    for i, kind in found:
        call = calls[i]
        if kind is None:
            raise NotFound(f"the input of {call.name} is neither an activation's output, nor act(gate) * up")
        gated, act = kind
        width = call.x.shape[-1]
        sites.append(Site(call.name, call.module, call.x.reshape(-1, width), act.reshape(-1, width), gated,
                          call.y.reshape(-1, call.y.shape[-1])))
    return sites


def gram_keys(tokens: np.ndarray, vocab: int, n: int) -> np.ndarray:
    """(sequences, seq_len) key of the n-gram ending at each token, first token most significant."""
    key = tokens.astype(np.int64)
    for shift in range(1, n):
        prev = np.zeros_like(key)
        prev[:, shift:] = tokens[:, :-shift]
        key = key + prev * vocab ** shift
    return key


def gram_pairs(tokens: np.ndarray, fires: np.ndarray, g: np.ndarray, vocab: int, n: int, first_pos: int):
    """(gram, neuron, count, g_sum) of the fires at tokens whose n-gram avoids positions < first_pos,
    sorted by gram then neuron: what the recorder counts for n-gram order n."""
    seqs, seq_len = tokens.shape
    keys = gram_keys(tokens, vocab, n).reshape(-1)
    valid = np.tile(np.arange(seq_len) - n + 1 >= first_pos, seqs)
    rows, neurons = np.nonzero(fires & valid[:, None])
    pair = keys[rows] * fires.shape[1] + neurons
    unique, inverse, count = np.unique(pair, return_inverse=True, return_counts=True)
    g_sum = np.bincount(inverse, weights=g[rows, neurons].astype(np.float64), minlength=len(unique))
    d = fires.shape[1]
    return unique // d, (unique % d).astype(np.int32), count.astype(np.int64), g_sum


def stats_from(g: torch.Tensor, act: torch.Tensor, tokens: np.ndarray, taus: list[float], primary: int,
               vocab: int) -> dict:
    """One layer's reference statistics from its g and firing input, (tokens, d_ffn) in token order."""
    n, seq_len = tokens.shape
    g, act = g.float(), act.float()
    fires = act > taus[primary]
    d = g.shape[1]
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
    return {
        "fire_count": np.stack([(act > t).sum(0).numpy() for t in taus]),
        "g_sum": g.double().sum(0).numpy(),
        "g_sumsq": (g.double() ** 2).sum(0).numpy(),
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


@torch.no_grad()
def reference_stats(model, tokens: np.ndarray, taus: list[float], primary: int) -> dict[int, dict]:
    """layer -> its statistics over `tokens` (one batch), from the FFN the reference finds itself."""
    sites = find_ffn(model, torch.as_tensor(tokens, dtype=torch.long))
    vocab = model.config.vocab_size
    return {i: stats_from(site.g, site.act, tokens, taus, primary, vocab) for i, site in enumerate(sites)}


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
