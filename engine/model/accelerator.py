"""The CUDA-only runtime calls (streams, events, pinned host memory, free device memory), in one place.

Everything else in the engine computes with plain tensor operations on whatever device it is given.
These calls are the ones a CPU-only build of torch cannot make, so the GPU path is tested on a CPU by
swapping `runtime` for a stand-in (tests/fake_cuda.py) while torch's FakeTensorMode makes fake `cuda`
tensors: any operation that mixes devices raises there as it would on a GPU.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


class CudaRuntime:
    """torch.cuda, as the engine uses it."""

    def available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def set_device(self, device: torch.device) -> None:
        torch.cuda.set_device(device)

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        """(free, total) bytes on the device."""
        return torch.cuda.mem_get_info(device)

    def stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def event(self):
        return torch.cuda.Event()

    def use_stream(self, stream):
        """Queue the block's work on `stream`."""
        return torch.cuda.stream(stream)

    def use_device(self, device: torch.device):
        return torch.cuda.device(device)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        """`tensor`'s memory is not reused before `stream`'s work queued so far is done."""
        tensor.record_stream(stream)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """Page-locked host memory, for asynchronous copies to and from a GPU."""
        return torch.empty(shape, dtype=dtype, pin_memory=True)


runtime = CudaRuntime()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timings); nothing to wait for off a GPU."""
    if device.type == "cuda":
        runtime.synchronize(device)


def free_bytes(device: torch.device) -> int | None:
    """Free memory on a GPU; None for the CPU."""
    return runtime.mem_get_info(device)[0] if device.type == "cuda" else None


def on_stream(device: torch.device, stream):
    """Queue the block's work on `stream` of a GPU; no-op context otherwise (stream None)."""
    return runtime.use_stream(stream) if device.type == "cuda" and stream is not None else nullcontext()


@contextmanager
def use_runtime(stand_in):
    """Replace the runtime for the block (tests)."""
    global runtime
    previous, runtime = runtime, stand_in
    try:
        yield stand_in
    finally:
        runtime = previous
