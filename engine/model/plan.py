"""Device and memory plans: which device, how many layers stay on it, how much host memory hidden states
may take, and giving freed heap back to the OS.

The arithmetic is pure (WeightSizes, RecordSizes, the device kind and its free bytes -> MemoryPlan), so
it is tested on CPU with the sizes of models no test machine holds; the functions taking `lm` only
measure the model and ask the GPU for its free memory."""
from __future__ import annotations

import ctypes
import ctypes.util
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from ffnscope.cache.errors import UserError
from ffnscope.cache.state import Samples
from ffnscope.engine.model import accelerator
from ffnscope.engine.model.runner import param_bytes
from ffnscope.engine.units import human

RUNTIME_BYTES = 1 << 30  # interpreter, torch, transformers, numba's compiled kernels
DEVICE_SHARE = 0.9       # of a GPU's free memory the plan may fill; the rest absorbs the allocator's slack
SAMPLE_BYTES = np.dtype(Samples.DTYPE).itemsize  # per activation sample value

# what a recording holds per token besides statistics (host_token_bytes)
TOKEN_BYTES = 4 + 1      # an int32 token id and a uint8 domain id (engine.data.packing.Packed, cache.state.DataState)
GRAM_BYTES = 16          # a distinct 2- or 3-gram of DataState.grams: int64 gram, int64 count
GRAM_MERGE_BYTES = 24    # cache.state.merge_sorted_counts, a shard's counts joining the part's: a copy of the
                         # counts and the new gram and count arrays (tracemalloc, numpy 2.4)
# per token of a shard, at most a 2- and a 3-gram: their counts (16 bytes each) and merge_sorted_counts' search
# and insertion of them (75 measured; data_counts' keys, masks and sorts before: 92 in all), and the shard's
# streams appended to the part's
SHARD_TOKEN_BYTES = 2 * (GRAM_BYTES + 75) + TOKEN_BYTES


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
    pinned_layer: int   # page-locked bytes a streamed layer's read takes on a GPU (pinned_blocks)


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
    hidden_seqs: int = 0      # sequences of the hidden-state buffer (hidden_seqs); 0: one shard's
    tokens: int = 0           # tokens this recording (part) records: its DataState's
    total_tokens: int = 0     # tokens of the packed data the job holds (every part's)
    vocab: int = 0
    distinct_grams: int | None = None  # distinct 2- and 3-grams of the data when counted; None: their bound

    @property
    def shard_hidden_bytes(self) -> int:
        """The hidden-state buffer the executor allocates once and reuses for every shard and the calibration."""
        seqs = self.hidden_seqs or max(1, self.shard_tokens // self.seq_len)
        return seqs * self.seq_len * self.d_model * self.hidden_itemsize


@dataclass(frozen=True)
class MemoryPlan:
    """What plan_memory decided. Unpacks as (resident, hidden_bytes), as its callers always took it."""
    resident: int              # leading decoder layers kept on the device
    hidden_bytes: int          # host bytes a shard's hidden states may take before they go to a mapped file
    hidden_on_device: bool     # a GPU holds the shard's hidden states beside its weights and workspace: an
                               # executor may keep them there instead of copying each batch to the host
    host_bytes: int            # host memory the recording needs besides the hidden states
    device_weight_bytes: int   # weights on the device: non-layer, resident layers, one streaming slot
    hidden_where: str = "memory"  # where the hidden-state buffer goes (hidden_placement)
    hidden_host_bytes: int = 0    # host bytes it takes there, as the allocator takes them
    locked_bytes: int = 0         # page-locked host bytes: streamed layers' pinned reads, a pinned hidden buffer

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
    pinned = pinned_blocks([t.numel() * t.element_size() for t in layer.state_dict().values()] for layer in layers)
    return WeightSizes(n_layers=len(layers), per_layer=max(param_bytes(layer) for layer in layers),
                       base=param_bytes(lm.adapter.base) - in_layers, fixed=total - in_layers, head=head,
                       total=total, from_files=getattr(lm, "weights", None) is not None, pinned_layer=pinned)


def calibration_seqs(n_seqs: int, calib_tokens: int, seq_len: int) -> int:
    """Sequences of the calibration sample, spread over the whole data's `n_seqs` (Recorder.calibration_rows)."""
    return max(1, min(n_seqs, calib_tokens // seq_len))


def hidden_seqs(meta: dict) -> int:
    """Sequences of the one hidden-state buffer a recording allocates (Recorder._host_buffer): the largest
    block it runs, a shard (at most the part's sequences) or the calibration sample (counted even where no
    calibration runs, a resume: at most calib_tokens)."""
    rec, seq_len = meta["recording"], meta["data"]["seq_len"]
    lo, hi = rec["seq_range"]
    shard = min(max(1, rec["shard_tokens"] // seq_len), hi - lo)
    return max(shard, calibration_seqs(rec["n_seqs_total"], rec.get("calib_tokens", 0), seq_len))


def record_sizes(lm, meta: dict, batch_tokens: int | None = None) -> RecordSizes:
    rec, model, config = meta["recording"], meta["model"], lm.config
    return RecordSizes(d_model=model["d_model"], d_ffn=model["d_ffn"], seq_len=meta["data"]["seq_len"],
                       recorded_layers=len(rec["layers"]), topk=rec["topk"], samples=rec["samples"],
                       batch_tokens=rec["batch_tokens"] if batch_tokens is None else batch_tokens,
                       shard_tokens=rec["shard_tokens"],
                       heads=getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1),
                       hidden_itemsize=_dtype_bytes(model.get("dtype")), hidden_seqs=hidden_seqs(meta),
                       tokens=rec["part_tokens"], total_tokens=meta["data"]["tokens_total"],
                       vocab=model["vocab_size"],
                       distinct_grams=rec.get("distinct_grams"))  # counted with ngram_bound (engine.record.job)


def layer_sizes(lm) -> tuple[int, int]:
    """(bytes of the weights outside the decoder layers, bytes of the largest layer); meta tensors count."""
    sizes = weight_sizes(lm)
    return sizes.fixed, sizes.per_layer


# --- the arithmetic --------------------------------------------------------------------------------
# Pinned host memory is charged as torch's pinned-host caching allocator takes it: each block rounded up to a
# power of two (its free lists are indexed by the power) and cached, locked, for reuse. Charging that, rather
# than pinning exact bytes, keeps the copies as they are: exact pinning of the hidden states would need a
# pageable buffer and pinned staging chunks, one more host copy of every batch each way on every layer. Where
# the rounded block does not fit, the buffer is pageable instead (hidden_placement): no disk, synchronous copies.
# A torch set to round less (PYTORCH_ALLOC_CONF pinned_max_round_threshold_mb) locks less than charged.
def pinned_bytes(nbytes: int) -> int:
    """Page-locked bytes torch's allocator takes for a pinned tensor of `nbytes`: the next power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def pinned_blocks(layers: Iterable[Iterable[int]]) -> int:
    """Page-locked bytes streamed layers' pinned reads keep (weights.read_tensors pins each tensor), given each
    layer's tensor bytes: one layer is read at a time (LayerRunner: one prefetch, its pinned copies freed once
    on the device), and the allocator's cache keeps, per rounded size, the most blocks any layer took."""
    most: Counter = Counter()
    for layer in layers:
        most |= Counter(pinned_bytes(n) for n in layer)  # | keeps each size's larger count
    return sum(size * count for size, count in most.items())


def hidden_placement(nbytes: int, room: int, device_kind: str, on_device: bool = False) -> str:
    """Where the hidden-state buffer of `nbytes` goes with `room` host bytes for it (MemoryPlan.hidden_bytes):
    "device" when a GPU's plan found room there; "pinned" (a GPU's copies run asynchronously) when the pinned
    block, rounded up (pinned_bytes), fits; "memory" (pageable) when the bytes themselves do; else "file" (a
    memory-mapped file beside the output)."""
    if device_kind == "cuda" and on_device:
        return "device"
    if device_kind == "cuda" and pinned_bytes(nbytes) <= room:
        return "pinned"
    return "memory" if nbytes <= room else "file"


def hidden_host_bytes(nbytes: int, where: str) -> int:
    """Host bytes the hidden-state buffer takes at `where` (hidden_placement); a mapped file's pages are the OS's."""
    return {"pinned": pinned_bytes(nbytes), "memory": nbytes}.get(where, 0)


def device_workspace(batch_tokens: int, d_model: int, d_ffn: int) -> int:
    """GPU bytes one batch of one layer needs beside the weights (activations, FFN, statistics)."""
    return batch_tokens * (8 * d_ffn + 16 * d_model) * 4


PAIR_SHARE = 16       # the default capacity of a batch's kept fires: 1/16 of its tokens x counted neurons
PAIR_FLOOR = 1 << 16  # and at least this many (a small batch is kept whole)


def default_pair_capacity(tokens: int, n_counted: int) -> int:
    """Fires of a batch a GPU keeps for its n-gram pairs by default (engine.record.stats.LayerStats: no host
    synchronization per batch): 1/PAIR_SHARE of its tokens x counted neurons, 3.7 times the highest mean fire
    rate of SmolLM2-135M's n-gram layers at tau 1 (1.7 %); past it a batch overflows (pairs_overflowed)."""
    return min(tokens * n_counted, max(PAIR_FLOOR, -(-tokens * n_counted // PAIR_SHARE)))


def kept_pairs_bytes(r: RecordSizes, device_kind: str) -> int:
    """GPU bytes of a shard's n-gram fires kept until each layer's end, at the default capacity, every neuron
    counted (a layer without n-grams is charged all the same): per kept fire its index (int32 while a batch's
    tokens x neurons fit, else int64) and g there."""
    if device_kind != "cuda":
        return 0
    batches, last = divmod(r.shard_tokens, r.batch_tokens)
    index_bytes = 4 if r.batch_tokens * r.d_ffn < 2 ** 31 else 8
    slots = batches * default_pair_capacity(r.batch_tokens, r.d_ffn)
    slots += default_pair_capacity(last, r.d_ffn) if last else 0
    return slots * (index_bytes + r.hidden_itemsize)


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


def pinned_weight_bytes(w: WeightSizes, device_kind: str, resident: int) -> int:
    """Page-locked bytes of a GPU's streamed layers read per layer: one layer at a time passes through pinned
    host memory on its way (a prefetch frees its pinned copy once the layer is on the device), as the allocator
    keeps it (pinned_blocks)."""
    streams = device_kind == "cuda" and w.from_files and resident < w.n_layers  # elsewhere read to the device
    return w.pinned_layer if streams else 0


def host_weight_bytes(w: WeightSizes, device_kind: str, resident: int, prefetch: bool = False) -> int:
    """Weight bytes held in host memory while `resident` layers stay on the device. On the CPU the device
    is the host: the non-layer weights, the resident layers and, read per layer, the streamed one computing
    (and with a prefetch the next one being read meanwhile; a model loaded whole: all of it). On a GPU the
    non-layer weights of the base and the resident layers are there; the host keeps an untied head and,
    loaded whole, the streamed layers; read per layer, the pinned copies of one (pinned_weight_bytes)."""
    streamed = w.n_layers - min(resident, w.n_layers)
    if device_kind == "cpu":
        in_flight = min(streamed, 2 if prefetch else 1)
        return w.fixed + (w.n_layers - streamed + in_flight) * w.per_layer if w.from_files else w.total
    return w.head + (pinned_weight_bytes(w, device_kind, resident) if w.from_files else streamed * w.per_layer)


def host_token_bytes(r: RecordSizes) -> int:
    """Host bytes that grow with the recording's tokens: the job's packed data (every part's tokens) and this
    part's DataState (its tokens: the same int32 and uint8 streams, an int64 number a sequence, unigram counts,
    and its 2- and 3-gram counts, each held and merged once more when a shard's join them), and a shard's
    transients (SHARD_TOKEN_BYTES). Distinct n-grams: as counted, else their bound (at most one of each order
    a token, and vocab^n)."""
    grams = (sum(min(r.tokens, r.vocab ** n) for n in (2, 3)) if r.distinct_grams is None
             else min(r.distinct_grams, 2 * r.tokens))
    streams = TOKEN_BYTES * (r.total_tokens + r.tokens) + 8 * (r.tokens // r.seq_len)
    unigram = 3 * 8 * r.vocab  # the part's int64 counts, a shard's and their sum
    shard = SHARD_TOKEN_BYTES * min(r.shard_tokens, r.tokens)
    return streams + unigram + (GRAM_BYTES + GRAM_MERGE_BYTES) * grams + shard


def host_other_bytes(r: RecordSizes, device_kind: str) -> int:
    """Host memory a recording needs besides weights and the shard's hidden states: every layer's
    statistics, one layer's accumulators in flight, the samples (and one copy: when Samples grow past their
    room, or are written from it), pos_fire's increments since the checkpoint base, what grows with the
    tokens (host_token_bytes), the runtime and a batch's workspace."""
    state = r.recorded_layers * r.d_ffn * (r.seq_len * 4 + r.topk * 12 + 64)
    one_layer = state // max(r.recorded_layers, 1) * 3  # int64 positions
    samples = r.samples * r.recorded_layers * r.d_ffn * SAMPLE_BYTES
    # pos_fire's increments since the checkpoint's base (cache.state.PosIncrements): uint16 at most, and
    # one layer's new array while it widens
    increments = (r.recorded_layers + 1) * r.seq_len * r.d_ffn * 2
    return (state + one_layer + 2 * samples + increments + host_token_bytes(r) + RUNTIME_BYTES
            + batch_workspace_bytes(r, device_kind))


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
    workspace = device_workspace(r.batch_tokens, r.d_model, r.d_ffn) + kept_pairs_bytes(r, device_kind)
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
    where = hidden_placement(r.shard_hidden_bytes, hidden, device_kind, hidden_on_device)
    hidden_host = hidden_host_bytes(r.shard_hidden_bytes, where)
    locked = pinned_weight_bytes(w, device_kind, resident) + (hidden_host if where == "pinned" else 0)
    return MemoryPlan(resident, hidden, hidden_on_device, host, on_device, where, hidden_host, locked)


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
    memory = plan(weight_sizes(lm), record_sizes(lm, meta, batch_tokens), device.type, device_budget,
                  host_budget, _free_bytes(device), prefetch=True)
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
