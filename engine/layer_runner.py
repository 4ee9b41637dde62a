"""Run a decoder one layer at a time, and read its FFN neurons on the way.

The model's own forward prepares what each layer needs (embeddings, rotary tables, masks); we
run it once per batch with every decoder layer swapped for a stand-in that records its call
and passes the hidden state through. That costs an embedding lookup and no layer, and works for
every family without re-implementing its forward. Afterwards each real layer can be called on
any batch with the recorded arguments, in whatever order the caller likes: layer-major.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine.adapters import Adapter


class _StandIn(nn.Module):
    """Records the arguments a layer is called with; returns the hidden state untouched."""

    def __init__(self, layer: nn.Module, returns_tuple: bool, sink: list):
        super().__init__()
        self.__dict__["_real"] = layer  # not a submodule: model.to() must not move it
        self._returns_tuple = returns_tuple
        self._sink = sink

    def __getattr__(self, name):  # layer attributes the model's forward may read (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._sink.append((args[1:], kwargs, hidden))
        return (hidden, None) if self._returns_tuple else hidden


@contextmanager
def _layers_swapped(adapter: Adapter, sink: list):
    layers = adapter.layers
    real = list(layers)
    for i, layer in enumerate(real):
        layers[i] = _StandIn(layer, adapter.family.returns_tuple, sink)
    try:
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


@dataclass
class LayerCall:
    """The arguments the model passes a layer for one batch shape (positional, keyword)."""
    args: tuple
    kwargs: dict


def param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class LayerRunner:
    """Places the model on a device under a weight budget and runs single layers.

    The first `resident` layers (and everything that is not a decoder layer) live on the device;
    the others stay in host memory and are copied in by `weights(i)` when their turn comes.
    """

    def __init__(self, adapter: Adapter, device: torch.device, resident: int):
        self.adapter = adapter
        self.device = device
        self.layers = list(adapter.layers)
        self.resident = min(resident, len(self.layers))
        self.bytes_moved = 0
        self._calls: dict[tuple, list[LayerCall]] = {}
        with _layers_swapped(adapter, []):  # move the non-layer parts only
            adapter.base.to(device)
        for layer in self.layers[: self.resident]:
            layer.to(device)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state entering layer 0; also records each layer's call for this batch shape."""
        sink: list = []
        with _layers_swapped(self.adapter, sink):
            self.adapter.base(input_ids=input_ids.to(self.device), use_cache=False)
        key = tuple(input_ids.shape)
        if key not in self._calls:  # full-length sequences: the calls depend on the shape only
            self._calls[key] = [LayerCall(args, kwargs) for args, kwargs, _ in sink]
        return sink[0][2]

    def weights(self, index: int) -> dict | None:
        """Device copies of a streamed layer's weights (None for a resident layer)."""
        if index < self.resident:
            return None
        layer = self.layers[index]
        self.bytes_moved += param_bytes(layer)  # what a device copy moves (a no-op copy on CPU)
        return {k: v.to(self.device, non_blocking=True) for k, v in layer.state_dict().items()}

    @torch.inference_mode()
    def run(self, index: int, hidden: torch.Tensor, weights: dict | None) -> torch.Tensor:
        layer = self.layers[index]
        call = self._calls[tuple(hidden.shape[:2])][index]
        if weights is None:
            out = layer(hidden, *call.args, **call.kwargs)
        else:
            out = torch.func.functional_call(layer, weights, (hidden, *call.args), call.kwargs)
        return out[0] if isinstance(out, tuple) else out


class FFNProbe:
    """Catches a layer's FFN hidden activation g and, for gated FFNs, act(gate) during its forward."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.g: torch.Tensor | None = None
        self.act: torch.Tensor | None = None

    @contextmanager
    def attached(self, layer: nn.Module):
        def on_down(_module, args):
            self.g = args[0]

        def on_act(_module, _args, output):
            self.act = output

        handles = [self.adapter.down_module(layer).register_forward_pre_hook(on_down)]
        if self.adapter.family.gated:
            handles.append(self.adapter.act_module(layer).register_forward_hook(on_act))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (g, firing input), both (tokens, d_ffn); the second is g itself for plain FFNs."""
        g = self.g.reshape(-1, self.g.shape[-1])
        act = g if self.act is None else self.act.reshape(-1, self.act.shape[-1])
        self.g = self.act = None
        return g, act
