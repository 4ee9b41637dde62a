"""Run a decoder one layer at a time, and read its FFN neurons on the way.

The model's own forward prepares what each layer needs (embeddings, rotary tables, masks); we
run it once per batch with every decoder layer swapped for a stand-in that records its call
and passes the hidden state through. That costs an embedding lookup and no layer, and works for
every architecture without re-implementing its forward. Afterwards each real layer can be called on
any batch with the recorded arguments, in whatever order the caller likes: layer-major.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ffnscope.cache.errors import UserError
from ffnscope.engine.model.sites import Adapter


class _AllLayersSeen(Exception):
    """Raised by the last stand-in: nothing after the decoder layers (norm, head) needs to run."""


class _StandIn(nn.Module):
    """Records the arguments a layer is called with; returns the hidden state untouched, as a
    tensor or as (hidden, None), whichever the model's forward expects of its layers."""

    def __init__(self, layer: nn.Module, returns_tuple: bool, sink: list, last: bool):
        super().__init__()
        self.__dict__["_real"] = layer  # not a submodule: model.to() must not move it
        self._returns_tuple = returns_tuple
        self._sink = sink
        self._last = last

    def __getattr__(self, name):  # layer attributes the model's forward may read (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._sink.append((args[1:], kwargs, hidden))
        if self._last:
            raise _AllLayersSeen()
        return (hidden, None) if self._returns_tuple else hidden


@contextmanager
def _layers_swapped(adapter: Adapter, sink: list, returns_tuple: bool = False):
    layers = adapter.layers
    real = list(layers)
    for i, layer in enumerate(real):
        layers[i] = _StandIn(layer, returns_tuple, sink, last=i == len(real) - 1)
    try:
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


def record_layer_calls(adapter: Adapter, input_ids: torch.Tensor, returns_tuple: bool | None = None):
    """Run the model's forward with every decoder layer swapped for a stand-in; -> (calls, convention)
    where calls[i] = (args, kwargs, hidden) of layer i. The layers' return convention (a tensor, or a
    tuple led by it) is learned from the model: with the wrong one, a layer after the first sees a
    hidden state of another shape (the forward indexed [0] into a tensor) or the forward fails."""
    tries = (False, True) if returns_tuple is None else (returns_tuple,)
    failure = None
    for convention in tries:
        sink: list = []
        try:
            with _layers_swapped(adapter, sink, convention):
                adapter.base(input_ids=input_ids, use_cache=False)
        except _AllLayersSeen:
            pass
        except (TypeError, AttributeError, IndexError, ValueError, RuntimeError) as error:
            failure = error
            continue
        shapes = {tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None for _a, _k, hidden in sink}
        if len(sink) == len(adapter.layers) and len(shapes) == 1:
            return sink, convention
    raise UserError(f"cannot record {adapter.name}: its decoder layers cannot be run one at a time (its forward "
                    f"does not pass one hidden state from layer to layer{': ' + str(failure).splitlines()[0] if failure else ''})")


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
    `weights(i)` brings in any other layer when its turn comes: read from the model's files straight to
    the device when the model was loaded per layer (engine.model.weights), else copied from host memory.
    """

    def __init__(self, adapter: Adapter, device: torch.device, resident: int):
        self.adapter = adapter
        self.device = device
        self.layers = list(adapter.layers)
        self.resident = min(resident, len(self.layers))
        self.bytes_moved = 0
        self._calls: dict[tuple, list[LayerCall]] = {}
        self.returns_tuple: bool | None = None  # the layers' return convention, learned on the first batch
        self._files = adapter.weights  # None: every weight is in memory already
        with _layers_swapped(adapter, []):  # move the non-layer parts only
            adapter.base.to(device)
        for index, layer in enumerate(self.layers[: self.resident]):
            if self._in_files(index):
                self._files.load(index, device)  # read once; it stays
            else:
                layer.to(device)

    def _in_files(self, index: int) -> bool:
        return self._files is not None and not self._files.is_loaded(index)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state entering layer 0; also records each layer's call for this batch shape."""
        sink, self.returns_tuple = record_layer_calls(self.adapter, input_ids.to(self.device), self.returns_tuple)
        key = tuple(input_ids.shape)
        if key not in self._calls:  # full-length sequences: the calls depend on the shape only
            self._calls[key] = [LayerCall(args, kwargs) for args, kwargs, _ in sink]
        return sink[0][2]

    def weights(self, index: int) -> dict | None:
        """Device copies of a streamed layer's weights (None for a resident layer); they are gone when the
        caller drops them."""
        if index < self.resident:
            return None
        layer = self.layers[index]
        self.bytes_moved += param_bytes(layer)  # what a device copy moves (a no-op copy on CPU)
        if self._in_files(index):
            return self._files.read(index, self.device)
        return {k: v.to(self.device, non_blocking=True) for k, v in layer.state_dict().items()}

    @torch.inference_mode()
    def run(self, index: int, hidden: torch.Tensor, weights: dict | None) -> torch.Tensor:
        layer = self.layers[index]
        call = self._calls[tuple(hidden.shape[:2])][index]
        if weights is None:
            out = layer(hidden, *call.args, **call.kwargs)
        else:
            out = torch.func.functional_call(layer, weights, (hidden, *call.args), call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out  # some layers return (hidden, ...), one a list


