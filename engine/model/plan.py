"""Device and memory plans: which device, how many layers stay on it, how much host memory hidden states
may take, and giving freed heap back to the OS.

The arithmetic is pure (WeightSizes, RecordSizes, the device kind and its free bytes -> MemoryPlan), so
it is tested on CPU with the sizes of models no test machine holds; the functions taking `lm` only
measure the model and ask the GPU for its free memory."""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import torch

from ffnscope.cache.errors import UserError
from ffnscope.engine.model import accelerator
from ffnscope.engine.model.runner import param_bytes
from ffnscope.engine.units import human

RUNTIME_BYTES = 1 << 30  # interpreter, torch, transformers, numba's compiled kernels
DEVICE_SHARE = 0.9       # of a GPU's free memory the plan may fill; the rest absorbs the allocator's slack


@dataclass(frozen=True)
class WeightSizes:
    """A model's weight bytes as the planner sees them (state_dict bytes, meta tensors included)."""
    n_layers: int
    per_layer: int      # the largest decoder layer
    base: int           # the base model's non-layer weights (embeddings, final norm): the runner moves them
    fixed: int          # every non-layer weight, tied ones counted once per name (layer_sizes)
    head: int           # weights outside the base model sharing no tensor with it (an untied LM head):
                        # they stay in host memory when the device is a GPU
    total: int          # every weight (a model loaded whole holds this on the host)
    from_files: bool    # decoder layers are read from the safetensors files when they run (lm.weights)


@dataclass(frozen=True)
class RecordSizes:
    """What a recording's host and device memory depend on, besides the weights."""
    d_model: int
    d_ffn: int
    seq_len: int
    recorded_layers: int
    topk: int
    samples: int
    batch_tokens: int
    shard_tokens: int
    heads: int
    hidden_itemsize: int = 4  # bytes per hidden-state element (the model's dtype)

    @property
    def shard_hidden_bytes(self) -> int:
        """One shard's hidden states, the buffer the executor allocates per shard."""
        return max(1, self.shard_tokens // self.seq_len) * self.seq_len * self.d_model * self.hidden_itemsize


@dataclass(frozen=True)
class MemoryPlan:
    """What plan_memory decided. Unpacks as (resident, hidden_bytes), as its callers always took it."""
    resident: int              # leading decoder layers kept on the device
    hidden_bytes: int          # host bytes a shard's hidden states may take before they go to a mapped file
    hidden_on_device: bool     # a GPU holds the shard's hidden states beside its weights and workspace: an
                               # executor may keep them there instead of copying each batch to the host
    host_bytes: int            # host memory the recording needs besides the hidden states
    device_weight_bytes: int   # weights on the device: non-layer, resident layers, one streaming slot

    def __iter__(self):
        return iter((self.resident, self.hidden_bytes))


def _dtype_bytes(name: str | None) -> int:
    return {"float16": 2, "bfloat16": 2, "half": 2}.get(str(name), 4)


def weight_sizes(lm) -> WeightSizes:
    layers = list(lm.adapter.layers)
    in_layers = sum(param_bytes(layer) for layer in layers)
    total = param_bytes(lm.model)
    base_tensors = {id(t) for t in lm.adapter.base.state_dict(keep_vars=True).values()}
    seen: set[int] = set()
    head = 0
    for tensor in lm.model.state_dict(keep_vars=True).values():
        if id(tensor) not in base_tensors and id(tensor) not in seen:
            seen.add(id(tensor))
            head += tensor.numel() * tensor.element_size()
    return WeightSizes(n_layers=len(layers), per_layer=max(param_bytes(layer) for layer in layers),
                       base=param_bytes(lm.adapter.base) - in_layers, fixed=total - in_layers, head=head,
                       total=total, from_files=getattr(lm, "weights", None) is not None)


def record_sizes(lm, meta: dict, batch_tokens: int | None = None) -> RecordSizes:
    rec, model, config = meta["recording"], meta["model"], lm.config
    return RecordSizes(d_model=model["d_model"], d_ffn=model["d_ffn"], seq_len=meta["data"]["seq_len"],
                       recorded_layers=len(rec["layers"]), topk=rec["topk"], samples=rec["samples"],
                       batch_tokens=rec["batch_tokens"] if batch_tokens is None else batch_tokens,
                       shard_tokens=rec["shard_tokens"],
                       heads=getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1),
                       hidden_itemsize=_dtype_bytes(model.get("dtype")))


def layer_sizes(lm) -> tuple[int, int]:
    """(bytes of the weights outside the decoder layers, bytes of the largest layer); meta tensors count."""
    sizes = weight_sizes(lm)
    return sizes.fixed, sizes.per_layer


# --- the arithmetic --------------------------------------------------------------------------------
def device_workspace(batch_tokens: int, d_model: int, d_ffn: int) -> int:
    """GPU bytes one batch of one layer needs beside the weights (activations, FFN, statistics)."""
    return batch_tokens * (8 * d_ffn + 16 * d_model) * 4


def batch_workspace_bytes(r: RecordSizes, device_kind: str) -> int:
    """Host bytes one forward batch of one layer needs. On the CPU its attention materializes the score
    matrix; on a GPU all that lives there, and the host sees only a batch of hidden states in and out."""
    if device_kind != "cpu":
        return 2 * r.batch_tokens * r.d_model * 4
    seqs = max(1, r.batch_tokens // r.seq_len)
    tokens = seqs * r.seq_len
    return 4 * (seqs * r.heads * r.seq_len * r.seq_len + tokens * (6 * r.d_ffn + 12 * r.d_model))


def streaming_slots(device_kind: str, prefetch: bool) -> int:
    """Device room kept for streamed layers: with a prefetch on a GPU (a recording: LayerRunner.weights
    brings the next layer in while the current one computes) two; on the CPU the device is the host, and
    host_weight_bytes charges the read."""
    return 2 if prefetch and device_kind == "cuda" else 1


def host_weight_bytes(w: WeightSizes, device_kind: str, resident: int, prefetch: bool = False) -> int:
    """Weight bytes held in host memory while `resident` layers stay on the device. On the CPU the device
    is the host: the non-layer weights, the resident layers and, read per layer, the streamed one computing
    (and with a prefetch the next one being read meanwhile; a model loaded whole: all of it). On a GPU the
    non-layer weights of the base and the resident layers are there; the host keeps an untied head and,
    loaded whole, the streamed layers; read per layer, one layer at a time passes through host memory on its
    way (a prefetch frees its pinned copy once the layer is on the device)."""
    streamed = w.n_layers - min(resident, w.n_layers)
    if device_kind == "cpu":
        in_flight = min(streamed, 2 if prefetch else 1)
        return w.fixed + (w.n_layers - streamed + in_flight) * w.per_layer if w.from_files else w.total
    return w.head + (min(streamed, 1) if w.from_files else streamed) * w.per_layer


def host_other_bytes(r: RecordSizes, device_kind: str) -> int:
    """Host memory a recording needs besides weights and the shard's hidden states: every layer's
    statistics, one layer's accumulators in flight, the samples (and their copy when written), the
    runtime and a batch's workspace."""
    state = r.recorded_layers * r.d_ffn * (r.seq_len * 4 + r.topk * 12 + 64)
    one_layer = state // max(r.recorded_layers, 1) * 3  # int64 positions
    samples = r.samples * r.recorded_layers * r.d_ffn * 2
    return state + one_layer + 2 * samples + RUNTIME_BYTES + batch_workspace_bytes(r, device_kind)


def device_weight_bytes(w: WeightSizes, resident: int, slots: int = 1) -> int:
    """Weights on the device: the base's non-layer ones, the resident layers, `slots` for streamed ones."""
    resident = min(resident, w.n_layers)
    return w.base + (resident + min(w.n_layers - resident, slots)) * w.per_layer


def resident_layers(budget: int, w: WeightSizes, slots: int = 1) -> int:
    """Leading layers a device weight budget keeps resident; `slots` layers' room is kept for the streamed."""
    room = budget - w.base
    if room < slots * w.per_layer and room // w.per_layer < w.n_layers:
        what = "one layer" if slots == 1 else f"{slots} layers (one computing, the next arriving)"
        raise UserError(f"--device-memory {human(budget)} does not hold the embeddings and {what} "
                        f"({human(w.base + slots * w.per_layer)}); raise it")
    fit = room // w.per_layer
    return w.n_layers if fit >= w.n_layers else int(fit) - slots


def device_budget(asked: int | None, device_kind: str, free: int | None, workspace: int) -> int | None:
    """Weight bytes the device may hold: the asked --device-memory (refused above a GPU's free memory),
    else most of a GPU's free memory less a batch's workspace; None on the CPU (no limit)."""
    if device_kind == "cpu" or free is None:
        return asked
    if asked is not None and asked > free:
        raise UserError(f"--device-memory {human(asked)} is above the {human(free)} free on the GPU; "
                        f"ask for {human(free)} or less")
    usable = int(free * DEVICE_SHARE) - workspace
    return usable if asked is None else asked


def plan(w: WeightSizes, r: RecordSizes, device_kind: str, device_memory: int | None, host_memory: int | None,
         free: int | None = None, prefetch: bool = False) -> MemoryPlan:
    """The memory plan of a recording; `free`: the GPU's free bytes (None on the CPU); `prefetch`: the next
    streamed layer is brought in while the current one computes (a recording's LayerRunner; NPL's passes not).

    On the CPU with a host budget, no device budget and layers read from their files, the device is the
    host: as many layers stay resident as the host budget leaves room for after one shard's hidden states."""
    workspace = device_workspace(r.batch_tokens, r.d_model, r.d_ffn)
    if device_kind == "cpu" and device_memory is None and host_memory is not None and w.from_files:
        # all the host holds but the base's non-layer weights and the resident layers, a shard's hidden states in
        others = host_weight_bytes(w, "cpu", 0, prefetch) - w.per_layer - w.base + host_other_bytes(r, "cpu") \
            + r.shard_hidden_bytes
        device_memory = max(host_memory - others, w.base + w.per_layer)  # too small: the host check says so
    budget = device_budget(device_memory, device_kind, free, workspace)
    slots = streaming_slots(device_kind, prefetch)
    resident = w.n_layers if budget is None else resident_layers(budget, w, slots)
    host = host_weight_bytes(w, device_kind, resident, prefetch) + host_other_bytes(r, device_kind)
    on_device = device_weight_bytes(w, resident, slots)
    hidden_on_device = (device_kind != "cpu" and free is not None
                        and r.shard_hidden_bytes <= min(budget, int(free * DEVICE_SHARE) - workspace) - on_device)
    if host_memory is None:
        hidden = 1 << 62
    else:
        hidden = host_memory - host
        if hidden <= 0:
            hint = (" (or keep fewer layers in memory with --device-memory)"
                    if device_kind == "cpu" and w.from_files and resident > 0 else "")
            raise UserError(f"--host-memory {human(host_memory)} is below the weights held and statistics "
                            f"({human(host)}); raise it{hint}")
    return MemoryPlan(resident, hidden, hidden_on_device, host, on_device)


# --- measured on a loaded model ------------------------------------------------------------------
def _free_bytes(device: torch.device) -> int | None:
    return accelerator.free_bytes(device)


def plan_device(budget: int | None, lm, device: torch.device, batch_tokens: int) -> int:
    """Number of leading layers a recording keeps resident; the rest stream through its slots (streaming_slots).
    Remembers on `lm` how many layers that keeps in host memory, for host_fixed_bytes."""
    w = weight_sizes(lm)
    d_model = lm.model.get_input_embeddings().weight.shape[1]
    allowed = device_budget(budget, device.type, _free_bytes(device),
                            device_workspace(batch_tokens, d_model, lm.adapter.d_ffn))
    resident = w.n_layers if allowed is None else resident_layers(allowed, w, streaming_slots(device.type, True))
    lm.host_layers = resident if device.type == "cpu" else 0
    return resident


def host_fixed_bytes(lm, meta: dict, host_layers: int | None = None, device_kind: str = "cpu") -> int:
    """Host memory a recording needs besides the shard's hidden states, with `host_layers` layers resident
    on the device (default: plan_device's choice on the CPU, else all)."""
    w = weight_sizes(lm)
    resident = getattr(lm, "host_layers", None) if host_layers is None else host_layers
    return (host_weight_bytes(w, device_kind, w.n_layers if resident is None else resident, prefetch=True)
            + host_other_bytes(record_sizes(lm, meta), device_kind))


def plan_memory(device_budget: int | None, host_budget: int | None, lm, meta: dict, device: torch.device,
                batch_tokens: int) -> MemoryPlan:
    """The recording's memory plan (see `plan`); unpacks as (resident layers, hidden-state bytes)."""
    memory = plan(weight_sizes(lm), record_sizes(lm, meta, batch_tokens), device.type, device_budget, host_budget,
                  _free_bytes(device), prefetch=True)
    lm.host_layers = memory.resident if device.type == "cpu" else 0
    return memory


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if accelerator.runtime.available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not accelerator.runtime.available():
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
