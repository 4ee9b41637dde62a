"""Reading and replacing FFN activation vectors g in a running model, and the model's own loss.

g is the input of the FFN output projection (engine.model.sites); its hook point (engine.model.hooks)
sees it, and may hand the module another tensor instead. Layers run one at a time through
engine.model.runner.LayerRunner, so a pass can stop after the last layer it needs, or start from
hidden states saved at a chunk's first layer.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

from ffnscope.engine.model.hooks import ffn_hooks
from ffnscope.engine.model.runner import LayerRunner
from ffnscope.engine.model.sites import Adapter

# replace(layer, g_computed) -> the tensor the output projection gets instead, or None to keep g
Replace = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def _w_out(adapter: Adapter, k: int, g: torch.Tensor) -> torch.Tensor:
    """Layer k's output rows in g's dtype, as the layer holds them: a streamed layer's weights are in place only
    during its call (at its g site, engine.model.hooks); a read from the files instead would be on the host."""
    if adapter.down_module(adapter.layers[k]).weight.is_meta:
        raise RuntimeError(f"layer {k}'s weights are not in place: compute its FFN output inside its call")
    return adapter.w_out(k).to(g.dtype)


def contribution(adapter: Adapter, k: int, g: torch.Tensor) -> torch.Tensor:
    """What layer k's FFN adds to the residual stream for activation g (bias included), inside its call."""
    layer = adapter.layers[k]
    down = adapter.down_module(layer)
    out = g @ _w_out(adapter, k, g)
    if getattr(down, "bias", None) is not None:
        out = out + down.bias.to(g.dtype)
    post = getattr(layer, "post_feedforward_layernorm", None)  # Gemma-2 normalizes the FFN output
    return post(out) if post is not None else out


def output_difference(adapter: Adapter, k: int, g: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """FFN_k(g) - FFN_k(other): what the residual stream gains with g instead of other, inside layer k's call."""
    if getattr(adapter.layers[k], "post_feedforward_layernorm", None) is None:  # linear: the bias cancels
        return (g - other) @ _w_out(adapter, k, g)
    return contribution(adapter, k, g) - contribution(adapter, k, other)


class GCapture:
    """What NPL does at the g site (engine.model.hooks) of chosen layers.

    `g[k]` holds the last g that layer k computed (before any replacement), (B, T, d_ffn); where
    `replace(k, g)` returns a tensor, the output projection gets that instead. With `explicit=True` it
    also sums, over the replaced layers, the FFN output of the computed g minus that of the replacement
    (`delta`: what partial substitution adds back to the final hidden state).
    """

    def __init__(self, adapter: Adapter, layers, replace: Replace | None = None, explicit: bool = False):
        self.adapter = adapter
        self.layers = sorted(set(layers))
        self.replace = replace
        self.explicit = explicit
        self.g: dict[int, torch.Tensor] = {}
        self.delta: torch.Tensor | None = None

    def reset(self) -> None:
        self.g = {}
        self.delta = None

    def _at_g(self, k: int, g: torch.Tensor) -> torch.Tensor | None:
        self.g[k] = g
        new = self.replace(k, g) if self.replace is not None else None
        if new is None:
            return None
        new = new.to(g.dtype)
        if self.explicit:
            d = output_difference(self.adapter, k, g, new)
            self.delta = d if self.delta is None else self.delta + d
        return new

    @contextmanager
    def attached(self):
        with ffn_hooks(self.adapter, self.layers, g=self._at_g):
            yield self


def run_layers(runner: LayerRunner, hidden: torch.Tensor, start: int, stop: int,
               on_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run layers start..stop-1 on `hidden`; on_layer(k, output) after each."""
    for k in range(start, stop):
        hidden = runner.run(k, hidden, runner.weights(k))
        if on_layer is not None:
            on_layer(k, hidden)
    return hidden


def forward_workspace(lm, batch_tokens: int) -> int:
    """Bytes one layer's forward batch takes on a GPU (engine.model.plan's estimate)."""
    from ffnscope.engine.model.plan import device_workspace

    d_model = lm.model.get_input_embeddings().weight.shape[1]
    return device_workspace(batch_tokens, d_model, lm.adapter.d_ffn)


def forward_minimum(lm, batch_tokens: int) -> int:
    """Device bytes the smallest plan needs: the weights outside the layers, one layer slot, a batch."""
    from ffnscope.engine.model.plan import layer_sizes

    fixed, per_layer = layer_sizes(lm)
    return fixed + per_layer + forward_workspace(lm, batch_tokens)


def make_runner(lm, device: torch.device, batch_tokens: int, reserve: int = 0, limits=None,
                seq_len: int | None = None, host_reserve: int = 0, what: str = "its own data") -> LayerRunner:
    """A layer runner with as many layers resident as the device holds under the job's memory limits
    (engine.npl.plan.runner_resident: a plan.MemoryLimits; `reserve` bytes the caller keeps for itself on
    the device, `host_reserve` in host memory), the others streamed from the model's files; the LM head on
    the device too."""
    from ffnscope.engine.npl.plan import runner_resident

    device = torch.device(device)
    resident = runner_resident(lm, device, batch_tokens, seq_len or batch_tokens, reserve, limits, host_reserve, what)
    lm.host_layers = resident if device.type == "cpu" else 0
    runner = LayerRunner(lm.adapter, device, resident)
    lm.model.get_output_embeddings().to(device)
    return runner


def logits_of(adapter: Adapter, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final hidden states (after the last layer, before the final norm)."""
    model = adapter.model
    norm = adapter.final_norm  # None for OPT without a final norm (do_layer_norm_before=False)
    if norm is not None:
        hidden = norm(hidden)
    project_out = getattr(adapter.layers_holder, "project_out", None)  # OPT-350m's narrower embeddings
    if project_out is not None:
        hidden = project_out(hidden)
    logits = model.get_output_embeddings()(hidden).float()
    config = model.config
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies, Granite divides
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    divide = getattr(config, "logits_scaling", None)
    if isinstance(divide, (int, float)) and divide:
        logits = logits / divide
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def token_nll(adapter: Adapter, hidden: torch.Tensor, ids: torch.Tensor, chunk_tokens: int = 2048) -> torch.Tensor:
    """(B, T, d) final hidden states, (B, T) token ids -> (B, T-1) float32 loss of predicting token
    t+1 from positions <= t, computed in chunks so the (tokens, vocab) logits stay small."""
    b, t, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)
    target = ids[:, 1:].reshape(-1).to(hidden.device)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
    for lo in range(0, h.shape[0], chunk_tokens):
        logits = logits_of(adapter, h[lo:lo + chunk_tokens])
        out[lo:lo + chunk_tokens] = torch.nn.functional.cross_entropy(
            logits, target[lo:lo + chunk_tokens], reduction="none")
    return out.reshape(b, t - 1)


def as_ids(tokens: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(tokens).astype(np.int64))


class PassProgress:
    """Progress of forward passes counted in work units (tokens x layers run), reported per layer as
    tokens (a batch of a large model takes minutes): on_progress(dict(phase, tokens_done, tokens_total,
    tokens_per_s, eta_s, **extra)), the percent monotone across phases and passes."""

    def __init__(self, on_progress, tokens_total: int, units_total: float, phase: str):
        self.on_progress, self.tokens_total = on_progress, int(tokens_total)
        self.units_total, self.units = max(float(units_total), 1.0), 0.0
        self.phase, self.extra = phase, {}
        self.started = time.time()

    def step(self, units: float = 0.0, phase: str | None = None, **extra) -> None:
        self.units = min(self.units + units, self.units_total)
        self.phase = phase or self.phase
        self.extra.update(extra)
        if self.on_progress is None:
            return
        done = int(self.tokens_total * self.units / self.units_total)
        elapsed = time.time() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        self.on_progress(dict(phase=self.phase, tokens_done=done, tokens_total=self.tokens_total, tokens_per_s=rate,
                              eta_s=(self.tokens_total - done) / rate if rate > 0 else None, **self.extra))
