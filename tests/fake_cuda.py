"""The GPU code path run on a CPU-only torch: fake `cuda` tensors that fail on any operation mixing devices.

`fake_cuda()` makes `device="cuda"` work without a GPU:
- torch's FakeTensorMode: tensors carry a device, shape and dtype but no data; every operation checks its
  operands' devices as a CUDA kernel launch would (FakeTensorDeviceMismatchError where a cuda tensor meets a
  CPU or meta one; 0-dim CPU tensors mix, as on a GPU). Real tensors made before (a loaded skeleton's static
  weights, its CPU buffers and meta parameters) enter as what they are, so one left on the CPU fails there.
- a meta tensor (a weight still in the files) copied anywhere else fails, as torch fails it;
- a CUDA device guard that does nothing, registered from a tiny C++ library built once with the system
  compiler: a CPU-only build has none, and indexing or `.to("cuda")` a cuda tensor needs one (without a
  compiler the tests using this skip). It stays registered for the process; no CUDA kernel comes with it,
  so a real cuda tensor outside fake_cuda still fails, only with another message;
- `FakeRuntime` for engine.model.accelerator: streams and events that do nothing but check that an event
  is recorded before anything waits on it and that record_stream gets a device tensor; pinned memory is
  plain host memory; mem_get_info a fixed size; one device;
- the runner's prefetch runs when it is submitted, on the caller's thread (one FakeTensorMode cannot serve
  two threads at once): the futures, waits and events are the real code's, the overlap is not;
- safetensors files are read for real (a fake mode cannot build a tensor on a file's storage): what a
  layer read gives is a real CPU tensor, as on a GPU machine, and its way to the device is faked; a
  memory-mapped file (torch.from_file) is host memory without data;
- nn.Module.to moves each parameter and buffer (torch's own cannot swap a fake parameter for itself, which a
  second move of a module asks); as torch does with fake tensors, it makes new parameters, so a weight tied to
  one outside the moved module stays behind: that can only raise a false alarm, never hide a mismatch;
- torch.Generator("cuda") is a CPU generator (a CUDA one needs the CUDA library; fake tensors draw nothing).

The host reads a fake tensor cannot serve are replaced at their boundary, so a whole job runs on:
`.numpy()` of a fake CPU tensor gives zeros of its shape and dtype (of a fake cuda tensor it raises, as
torch does: the missing `.cpu()` is a bug a GPU shows); `.item()` / float() / int() give 0 (bool False);
equal and allclose True, after the operands' devices were checked; ops whose output size depends on values
(nonzero, unique, boolean-mask indexing, masked_select) act as if every element were selected / distinct.

Host synchronizations are counted by name in `FakeRuntime.syncs`: the ops above with a cuda operand (each
needs a value on the host: a GPU waits for its queue there), a blocking copy between the host and a cuda
tensor ("to_host", "to_device": torch waits for the stream after it), and the runtime's waits (event / stream /
device synchronize). A non_blocking copy is the stream's, not a wait, and is not counted (whether its host
memory is pinned, the fake cannot tell).

Covered: every device placement and transfer (skeleton, resident and streamed layers, buffers, hooks,
statistics kernels and their host copies, the runtime calls and their order of record/wait), dtype and shape
flow. Not covered: values (every number downstream of a fake tensor is 0, so no result is checked and
control flow on values takes one branch), real stream concurrency and memory reuse across streams (the
fake streams run nothing; the prefetch does not overlap), whether host memory is really pinned (a
non_blocking copy from pageable memory is not flagged), a generator's device, CUDA kernels themselves and
which dtypes they support (only meta functions run), and device memory (nothing is allocated: out-of-memory
and the plans' sizes are not exercised).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import safetensors
import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ffnscope.engine.model import accelerator

GiB = 1 << 30
_GUARD = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
"""
_guard_lib = None


class Unavailable(Exception):
    """The device guard cannot be built here (no C++ compiler, or the build failed)."""


def register_cuda_guard() -> None:
    """Build (once per torch) and load the no-op CUDA device guard."""
    global _guard_lib
    if _guard_lib is not None or torch.cuda.is_available():
        return
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise Unavailable("no C++ compiler to build a CUDA device guard for fake cuda tensors")
    root = Path(torch.__file__).parent
    key = hashlib.sha256(f"{torch.__version__}{root}{_GUARD}".encode()).hexdigest()[:12]
    lib = Path(tempfile.gettempdir()) / f"ffnscope-fake-cuda-guard-{os.getuid()}-{key}.so"
    if not lib.is_file():
        source = lib.with_suffix(f".{os.getpid()}.cpp")
        source.write_text(_GUARD)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        done = subprocess.run([compiler, "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                               f"-I{root / 'include'}", str(source), f"-L{root / 'lib'}", "-lc10",
                               f"-Wl,-rpath,{root / 'lib'}", "-o", str(tmp)], capture_output=True, text=True)
        source.unlink(missing_ok=True)
        if done.returncode != 0:
            raise Unavailable(f"building the CUDA device guard failed: {done.stderr[-500:]}")
        tmp.replace(lib)  # atomic: concurrent test runs never load a half-written library
    _guard_lib = ctypes.CDLL(str(lib))


# --- the runtime stand-in ----------------------------------------------------------------------------
def _count(counts: dict[str, int], name: str) -> None:
    counts[name] = counts.get(name, 0) + 1


class FakeEvent:
    def __init__(self, syncs: dict[str, int]):
        self.recorded = False
        self.syncs = syncs

    def record(self, stream=None) -> None:
        if stream is not None:
            assert isinstance(stream, FakeStream), f"event recorded on {stream!r}, not a stream"
        self.recorded = True

    def _check(self) -> None:
        assert self.recorded, "waiting on an event never recorded: on a GPU the wait orders nothing"

    def synchronize(self) -> None:
        self._check()
        _count(self.syncs, "event.synchronize")

    def wait(self, stream=None) -> None:
        self._check()

    def query(self) -> bool:
        self._check()
        return True


class FakeStream:
    def __init__(self, device: torch.device, syncs: dict[str, int]):
        self.device = torch.device(device)
        self.syncs = syncs
        assert self.device.type == "cuda", f"a CUDA stream on {self.device}"

    def wait_event(self, event: FakeEvent) -> None:
        event._check()

    def wait_stream(self, stream: "FakeStream") -> None:
        assert isinstance(stream, FakeStream)

    def synchronize(self) -> None:
        _count(self.syncs, "stream.synchronize")

    def record_event(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event or FakeEvent(self.syncs)
        event.record(self)
        return event


class FakeRuntime:
    """engine.model.accelerator's runtime without a GPU; counts what the engine asked of it (`calls`) and the
    host synchronizations (`syncs`, module doc)."""

    def __init__(self, free: int = 64 * GiB, total: int = 80 * GiB):
        self.free, self.total = free, total
        self.calls: dict[str, int] = {}
        self.syncs: dict[str, int] = {}
        self._streams: dict[torch.device, FakeStream] = {}

    def _count(self, name: str) -> None:
        _count(self.calls, name)

    def available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def set_device(self, device) -> None:
        self._count("set_device")
        assert torch.device(device).type == "cuda"

    def mem_get_info(self, device) -> tuple[int, int]:
        self._count("mem_get_info")
        assert torch.device(device).type == "cuda"
        return self.free, self.total

    def stream(self, device) -> FakeStream:
        self._count("stream")
        return FakeStream(device, self.syncs)

    def current_stream(self, device) -> FakeStream:
        device = torch.device(device)
        return self._streams.setdefault(device, FakeStream(device, self.syncs))

    def event(self) -> FakeEvent:
        self._count("event")
        return FakeEvent(self.syncs)

    def use_stream(self, stream):
        assert isinstance(stream, FakeStream), f"use_stream({stream!r})"
        self._count("use_stream")
        return nullcontext()

    def use_device(self, device):
        assert torch.device(device).type == "cuda"
        return nullcontext()

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        assert tensor.device.type == "cuda", f"record_stream of a {tensor.device} tensor (a GPU refuses it)"
        assert isinstance(stream, FakeStream)
        self._count("record_stream")

    def synchronize(self, device) -> None:
        assert torch.device(device).type == "cuda"
        _count(self.syncs, "synchronize")

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        self._count("pinned_empty")
        return torch.empty(shape, dtype=dtype)


# --- host reads ---------------------------------------------------------------------------------------
def _selected(t: torch.Tensor) -> torch.Tensor:
    """Indices (numel, dim) as nonzero gives them, every element taken."""
    return torch.empty((t.numel(), t.dim()), dtype=torch.int64, device=t.device)


def _scalar(t: torch.Tensor):
    """What .item() gives: 0 of the tensor's kind."""
    if t.dtype == torch.bool:
        return False
    return 0.0 if t.dtype.is_floating_point or t.dtype.is_complex else 0


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _unbool(indices):
    """Boolean masks among index tensors -> the long indices of every element (each one selected)."""
    out = []
    for index in indices:
        if _is_mask(index):
            out.extend(_selected(index).unbind(1))
        else:
            out.append(index)
    return out


def _on_cuda(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in pytree.tree_leaves((args, kwargs)))


def _blocking_copy(func, args, kwargs, out) -> str | None:
    """"to_host" / "to_device": a copy (to, _to_copy, copy_) between the host and a cuda tensor that the host
    waits for (not non_blocking); else None."""
    bound = {**dict(zip((a.name for a in func._schema.arguments), args)), **kwargs}
    source, target = (bound["src"], bound["self"]) if "src" in bound else (bound["self"], out)
    if bound.get("non_blocking", False) or source.device.type == target.device.type:
        return None
    return {("cuda", "cpu"): "to_host", ("cpu", "cuda"): "to_device"}.get((source.device.type, target.device.type))


class HostReads(TorchDispatchMode):
    """Above FakeTensorMode: the ops whose result depends on values get a value-free stand-in; each host
    synchronization is counted by name into `syncs` (module doc)."""

    aten = torch.ops.aten

    def __init__(self, syncs: dict[str, int] | None = None):
        super().__init__()
        self.syncs = {} if syncs is None else syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = self.aten
        packet = func.overloadpacket
        if packet in (aten.index, aten._unsafe_index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            if _on_cuda(args, kwargs) and any(map(_is_mask, args[1])):
                _count(self.syncs, f"{packet.__name__}[bool]")  # a mask's selected count comes to the host
            args = (args[0], _unbool(args[1]), *args[2:])
        elif packet is aten.from_file:  # a memory-mapped file (no fake kernel): host memory without data
            return torch.empty(args[2] if len(args) > 2 else kwargs.get("size") or 0, dtype=kwargs.get("dtype"))
        elif packet in (aten._to_copy, aten.copy_, aten.copy):  # a fake meta tensor would copy out "fine"
            source, target = (args[0], kwargs.get("device")) if packet is aten._to_copy else (args[1], args[0].device)
            if source.device.type == "meta" and target is not None and torch.device(target).type != "meta":
                raise NotImplementedError("Cannot copy out of meta tensor; no data!")  # torch's own words
        try:
            # `to` reaches us whole under inference mode, and FakeTensorMode would move a small constant (an
            # index list) with a real CUDA kernel
            out = func.decompose(*args, **kwargs) if packet is aten.to else func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            pass
        else:
            if packet in (aten.to, aten._to_copy, aten.copy_, aten.copy):
                copy = _blocking_copy(func, args, kwargs, out)
                if copy:
                    _count(self.syncs, copy)
            return out
        if _on_cuda(args, kwargs):  # a value the output's size or a Python value needs: the host waits for it
            _count(self.syncs, packet.__name__)
        x = args[0]
        if packet in (aten._local_scalar_dense, aten.item):
            return _scalar(x)
        if packet in (aten.equal, aten.allclose):
            torch.ops.aten.sub(x, args[1])  # the devices and shapes must agree all the same
            return True
        if packet is aten.is_nonzero:
            return False
        if packet is aten.nonzero:
            return _selected(x)
        if packet is aten.nonzero_numpy:
            return _selected(x).unbind(1)
        if packet is aten.masked_select:
            return torch.empty(torch.broadcast_shapes(x.shape, args[1].shape).numel(), dtype=x.dtype,
                               device=x.device)
        if packet in (aten._unique2, aten.unique_consecutive, aten.unique_dim):
            n = x.numel()
            return (torch.empty(n, dtype=x.dtype, device=x.device),
                    torch.empty(x.shape, dtype=torch.int64, device=x.device),
                    torch.empty(n, dtype=torch.int64, device=x.device))
        raise NotImplementedError(f"tests.fake_cuda: {func} reads values of a fake tensor; give it a stand-in")


def _numpy(self, *, force: bool = False):
    if not isinstance(self, FakeTensor):
        return _real_numpy(self, force=force)
    if self.device.type != "cpu":  # torch's own refusal: a tensor must come to the host first
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy "
                        "the tensor to host memory first.")
    return np.zeros(tuple(self.shape), _NUMPY_DTYPES[self.dtype])


_real_numpy = torch.Tensor.numpy
_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
                 torch.bfloat16: np.float32, torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
                 torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}


class InlinePool:
    """The runner's prefetch pool, run on the submitting thread: one FakeTensorMode cannot serve two threads at
    once (its kernel-invocation state is shared), and torch's modes are per thread anyway."""

    def __init__(self, *_args, **_kwargs):
        pass

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - the caller's wait raises it, as with a thread
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


class _RealReads:
    """safetensors.safe_open whose file is opened and tensors read outside the fake modes."""

    def __init__(self, *args, **kwargs):
        with _disable_current_modes():
            self._handle = _safe_open(*args, **kwargs)

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_tensor(self, name):
        with _disable_current_modes():
            return self._handle.get_tensor(name)

    def __getattr__(self, name):
        return getattr(self._handle, name)


_safe_open = safetensors.safe_open


class _Generator(torch.Generator):
    """torch.Generator whose `cuda` ones are CPU ones: a CUDA generator needs the CUDA library, and a fake
    tensor draws nothing from it anyway."""

    def __new__(cls, device="cpu"):
        device = torch.device(device)
        return super().__new__(cls, "cpu" if device.type == "cuda" else device)

    def __init__(self, device="cpu"):
        pass


def _module_to(self, *args, **kwargs):
    """nn.Module.to for fake tensors: each parameter and buffer moved (a tensor already there kept, as torch
    keeps it; torch's own _apply cannot swap a fake parameter for itself), shared ones staying shared."""
    device, dtype, non_blocking, _format = torch._C._nn._parse_to(*args, **kwargs)
    moved: dict[int, torch.Tensor] = {}

    def to(t):
        if id(t) not in moved:
            cast = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else None
            new = t.to(device=device, dtype=cast, non_blocking=non_blocking)
            if new is not t and isinstance(t, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
            moved[id(t)] = new
        return moved[id(t)]

    for module in self.modules():
        for tensors in (module._parameters, module._buffers):
            for key, t in tensors.items():
                if t is not None:
                    tensors[key] = to(t)
    return self


@contextmanager
def fake_cuda(runtime: FakeRuntime | None = None):
    """Fake `cuda` tensors and the runtime stand-in for the block (module doc); -> the runtime."""
    import ffnscope.engine.model.runner as runner_module

    register_cuda_guard()
    runtime = runtime or FakeRuntime()
    with ExitStack() as stack:
        for owner, name, value in ((runner_module, "ThreadPoolExecutor", InlinePool),
                                   (safetensors, "safe_open", _RealReads), (torch.nn.Module, "to", _module_to),
                                   (torch, "Generator", _Generator), (torch.Tensor, "numpy", _numpy)):
            stack.enter_context(mock.patch.object(owner, name, value))
        stack.enter_context(accelerator.use_runtime(runtime))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(HostReads(runtime.syncs))  # above the fake mode: it sees each op first
        yield runtime
