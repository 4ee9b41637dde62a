"""Run a decoder one layer at a time, and read its FFN neurons on the way.

The model's own forward prepares what each layer needs (embeddings, rotary tables, masks); we
run it once per batch with every decoder layer swapped for a stand-in that records its call
and passes the hidden state through. That costs an embedding lookup and no layer, and works for
every architecture without re-implementing its forward. Afterwards each real layer can be called on
any batch with the recorded arguments, in whatever order the caller likes: layer-major.
"""
from __future__ import annotations

from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as WaitTimeout  # not the builtin TimeoutError before Python 3.11
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ffnscope.cache.errors import UserError
from ffnscope.engine.model import accelerator
from ffnscope.engine.model.sites import Adapter
from ffnscope.engine.model.weights import unfiled_buffers


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
    why = f": {str(failure).splitlines()[0]}" if failure else ""
    raise UserError(f"cannot record {adapter.name}: its decoder layers cannot be run one at a time (its forward "
                    f"does not pass one hidden state from layer to layer{why})")


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
    `weights(i, prefetch=j)` also starts bringing layer j in on one background thread while layer i
    computes: at most one layer in flight beyond the current one (engine.model.plan charges it).
    """

    POLL_S = 0.05  # how often a wait for a prefetched layer looks at the stop token

    def __init__(self, adapter: Adapter, device: torch.device, resident: int):
        self.adapter = adapter
        self.device = device
        self.layers = list(adapter.layers)
        self.resident = min(resident, len(self.layers))
        self.bytes_moved = 0
        self._calls: dict[tuple, list[LayerCall]] = {}
        self.returns_tuple: bool | None = None  # the layers' return convention, learned on the first batch
        self._files = adapter.weights  # None: every weight is in memory already
        self._pool: ThreadPoolExecutor | None = None  # the prefetch thread, started on first use
        self._pending: tuple[int, Future] | None = None  # (layer, its prefetch)
        self._copy_stream = accelerator.runtime.stream(device) if device.type == "cuda" else None
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

    def weights(self, index: int, prefetch: int | None = None, stop=None) -> dict | None:
        """Device copies of a streamed layer's weights (None for a resident layer); they are gone when the
        caller drops them. prefetch: the layer whose weights to start bringing in meanwhile; stop: a
        StopToken looked at while waiting for a prefetched layer."""
        weights = None
        if index >= self.resident:
            self.bytes_moved += param_bytes(self.layers[index])  # what a device copy moves (a no-op copy on CPU)
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == index:
                weights = self._wait(pending[1], stop)
            else:
                self._drop(pending)
                weights = self._fetch(index)
        self._start(prefetch)  # after the wait: never two layers in flight beyond the current one
        return self._on_compute_stream(weights)

    def _needs_read(self, index: int) -> bool:
        """A streamed layer whose weights take work to bring in (a host copy on the CPU is the layer itself)."""
        return index >= self.resident and (self._in_files(index) or self.device.type == "cuda")

    def _start(self, index: int | None) -> None:
        if index is None or index >= len(self.layers) or not self._needs_read(index):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ffnscope-prefetch")
        previous_done = None  # on a GPU: the compute queued so far, up to the previous layer, whose weights went
        if self.device.type == "cuda":
            previous_done = accelerator.runtime.event()
            previous_done.record(accelerator.runtime.current_stream(self.device))
        self._pending = (index, self._pool.submit(self._fetch, index, previous_done))

    def _wait(self, future: Future, stop) -> dict:
        """The prefetched weights; an error raised by the read is raised here, and a stop is not kept waiting."""
        while True:
            if stop is not None and stop.requested:
                self._drop((None, future))
                stop.check()
            try:
                return future.result(timeout=self.POLL_S)
            except WaitTimeout:
                continue

    @staticmethod
    def _drop(pending) -> None:
        """Forget a prefetch: cancelled if it has not started, else waited for (a read is bounded) with its
        result and any error discarded, so no thread outlives the caller's stop or error."""
        if pending is None:
            return
        future = pending[1]
        if not future.cancel():
            wait([future])
            try:
                future.exception()
            except CancelledError:
                pass

    def close(self) -> None:
        """Forget any prefetch and end its thread (after every block: a stop or an error included)."""
        pending, self._pending = self._pending, None
        self._drop(pending)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _fetch(self, index: int, previous_done=None):
        """Layer `index`'s weights on the device (on the prefetch thread or the caller's). On a GPU: read
        into pinned host memory, copied on a side stream once `previous_done` (an event) says the layer
        before the current one is through, so the device never holds more than two streamed layers;
        -> (weights, the copy's event)."""
        cuda = self.device.type == "cuda"
        if self._in_files(index):
            host = self._files.read(index, "cpu", pin=True) if cuda else self._files.read(index, self.device)
        else:
            host = self.layers[index].state_dict()
        # with the buffers neither brings (unfiled_buffers): a few small tensors, moved with the weights
        host.update(unfiled_buffers(self.layers[index], host))
        if not cuda:
            return {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        if previous_done is not None:
            previous_done.synchronize()
        runtime = accelerator.runtime
        with runtime.use_device(self.device), runtime.use_stream(self._copy_stream):
            weights = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            event = runtime.event()
            event.record(self._copy_stream)
        event.synchronize()  # this thread waits, not the GPU: then the pinned host copy may go
        return weights, event

    def _on_compute_stream(self, fetched):
        """On a GPU: the compute stream waits for the copy's event, and the weights' memory (allocated on the
        copy stream) is not reused before the compute stream is through with them."""
        if fetched is None or self.device.type != "cuda":
            return fetched
        weights, event = fetched
        compute = accelerator.runtime.current_stream(self.device)
        compute.wait_event(event)
        for tensor in weights.values():
            accelerator.runtime.record_stream(tensor, compute)
        return weights

    @torch.inference_mode()
    def run(self, index: int, hidden: torch.Tensor, weights: dict | None) -> torch.Tensor:
        layer = self.layers[index]
        call = self._calls[tuple(hidden.shape[:2])][index]
        if weights is None:
            out = layer(hidden, *call.args, **call.kwargs)
        else:
            out = torch.func.functional_call(layer, weights, (hidden, *call.args), call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out  # some layers return (hidden, ...), one a list


class HiddenStates:
    """A shard's hidden states between layers (`buffer`: all its sequences) and their way to the device and
    back, batch by batch. On the device or on the CPU nothing moves. From host memory to a GPU, batches
    move on a copy stream: batch b+1 goes up while b computes, each result comes back behind the compute,
    and events order the two streams, so neither the host nor the compute stream waits on a copy."""

    def __init__(self, buffer: torch.Tensor, device: torch.device, batches: list[tuple[int, int]]):
        self.buffer, self.device, self.batches = buffer, device, batches
        self.bytes_moved = 0  # host <-> device bytes (0 when the buffer is where the layers run)
        self._moves = buffer.device.type != device.type
        self._copy = accelerator.runtime.stream(device) if device.type == "cuda" and self._moves else None
        self._ahead: tuple | None = None  # (batch, its device copy, the copy's event)

    def get(self, b: int) -> torch.Tensor:
        """Batch b's hidden states on the device."""
        lo, hi = self.batches[b]
        if self._copy is None:
            self.bytes_moved += self.buffer[lo:hi].nbytes if self._moves else 0
            return self.buffer[lo:hi].to(self.device, non_blocking=True)
        ahead, self._ahead = self._ahead, None
        x, event = ahead[1:] if ahead is not None and ahead[0] == b else self._upload(b)
        if b + 1 < len(self.batches):
            self._ahead = (b + 1, *self._upload(b + 1))
        compute = accelerator.runtime.current_stream(self.device)
        compute.wait_event(event)
        # allocated on the copy stream: not reused before the compute is through
        accelerator.runtime.record_stream(x, compute)
        return x

    def put(self, b: int, out: torch.Tensor) -> None:
        """Batch b's output replaces its hidden states."""
        lo, hi = self.batches[b]
        if self._copy is None:
            self.bytes_moved += out.nbytes if self._moves else 0
            self.buffer[lo:hi] = out.to(self.buffer.device)
            return
        # on the copy stream, after what the compute stream queued so far (out among it); an upload of a
        # later layer reads these rows after this copy, being on the same stream
        self._copy.wait_stream(accelerator.runtime.current_stream(self.device))
        with accelerator.runtime.use_stream(self._copy):
            self.buffer[lo:hi].copy_(out, non_blocking=True)
        accelerator.runtime.record_stream(out, self._copy)
        self.bytes_moved += out.nbytes

    def _upload(self, b: int):
        lo, hi = self.batches[b]
        with accelerator.runtime.use_stream(self._copy):
            x = self.buffer[lo:hi].to(self.device, non_blocking=True)
            event = accelerator.runtime.event()
            event.record(self._copy)
        self.bytes_moved += x.nbytes
        return x, event

    def finish(self) -> None:
        """Wait for the copies still queued (before the buffer is reused or its file removed)."""
        self._ahead = None
        if self._copy is not None:
            self._copy.synchronize()
