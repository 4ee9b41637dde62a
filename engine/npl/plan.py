"""NPL memory plans. The fit's: the layer pairs in groups whose matrices fit the device (X^T X alone is
10.9 GB per source layer at d_ffn 36,864), one fit and one scoring pass over the data per group; what
cannot fit even one pair is refused before any data is read. Every NPL pass's model placement
(runner_resident): engine.model.plan's plan under the job's --device-memory / --host-memory, less what
the job holds itself, so layers beyond it stream from the model's files as in a recording."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ffnscope.cache.errors import UserError
from ffnscope.engine.model import accelerator
from ffnscope.engine.npl.capture import forward_minimum, forward_workspace
from ffnscope.engine.units import human

MEMORY_ENV = "FFNSCOPE_NPL_MEMORY"  # bytes the NPL fit's matrices may take, instead of the measured free memory


@dataclass(frozen=True)
class MemoryLimits:
    """A job's --device-memory and --host-memory, in bytes (None: what the device or the host has)."""
    device: int | None = None
    host: int | None = None

    def check(self) -> None:
        for name, value in (("--device-memory", self.device), ("--host-memory", self.host)):
            if value is not None and value <= 0:
                raise UserError(f"{name} must be positive")


def group_bytes(group, d: int, methods, stats_dtype: str, batch_tokens: int) -> int:
    """Peak bytes fitting and scoring `group` hold beside the model: each layer's batch of g and its
    shifted copy; float64 X^T X per source and X^T Y per pair with a batch product or the solve's three
    d^2 matrices (exact); W and its squared-gradient sum per pair and two gradient temporaries (Adagrad);
    then the maps in float32 while scoring."""
    m, n, size = d * d, len(group), 8 if stats_dtype == "float64" else 4
    batches = batch_tokens * d * (4 + size) * len({k for p in group for k in p})
    fit = batches
    if "exact" in methods:
        fit += 8 * m * (len({i for i, _ in group}) + n) + max(size * m, 3 * 8 * m)
    if "adagrad" in methods:
        fit += 8 * m * (n + 1)
    return max(fit, 4 * m * n * len(methods) + batches)


def _mem_available() -> int:
    from ffnscope.engine.record.config import available_memory  # the one reading of it

    return available_memory()


def memory_budget(lm, device: torch.device, option: int | None, batch_tokens: int, limits: MemoryLimits | None = None,
                  seq_len: int | None = None) -> tuple[int, str]:
    """(bytes the fit's matrices may take, what that is): the option or FFNSCOPE_NPL_MEMORY (on a CPU at most
    --host-memory less the model's smallest plan, host_floor: its layers then stream), else that, else 90%
    of the GPU's free memory less the model's smallest plan, or of the available host memory on a CPU (the
    model's weights are there already) less a forward batch."""
    from ffnscope.engine.model.plan import DEVICE_SHARE
    from ffnscope.engine.units import parse_bytes

    if option is None and os.environ.get(MEMORY_ENV):
        option = parse_bytes(os.environ[MEMORY_ENV], MEMORY_ENV)
    host = None
    room = host_room(lm, device, limits, seq_len or batch_tokens, batch_tokens)
    if room is not None:
        host = room, f"--host-memory {human(limits.host)} less the model's smallest plan"
    if option is not None:
        return (int(option), "the NPL memory budget") if host is None or option <= host[0] else host
    if host is not None:
        return host
    if device.type == "cuda":
        free, _total = accelerator.runtime.mem_get_info(device)
        return (int(free * DEVICE_SHARE) - forward_minimum(lm, batch_tokens),
                f"what {device} has free beside the model")
    return int(_mem_available() * 0.9) - forward_workspace(lm, batch_tokens), "the available host memory"


def host_room(lm, device: torch.device, limits: MemoryLimits | None, seq_len: int, batch_tokens: int) -> int | None:
    """On a CPU with --host-memory: what it leaves beside the model's smallest plan (host_floor), refused when
    nothing; None otherwise. A job checks it before it starts, so a budget that cannot run writes nothing."""
    if device.type != "cpu" or limits is None or limits.host is None:
        return None
    floor = host_floor(lm, seq_len, batch_tokens)
    if limits.host <= floor:
        raise UserError(f"--host-memory {human(limits.host)} does not hold the model's smallest plan "
                        f"({human(floor)}: the weights outside the layers, a layer, a batch); raise it")
    return limits.host - floor


def held_maps(n_pairs: int, d: int, methods) -> int:
    """Bytes of the float64 maps of `n_pairs` pairs as solved, before they are scored and stored."""
    return 8 * d * d * len(methods) * n_pairs


def plan_groups(pairs, d: int, methods, stats_dtype: str, batch_tokens: int, budget: int, where: str,
                results_on_device: bool, results_kept: bool = True) -> list[list[tuple[int, int]]]:
    """The pairs (sorted: those of one source stay together, sharing X^T X) in groups that each fit in
    `budget` bytes. On a CPU the float64 maps count too: every pair's when the results are kept in memory
    to the end (`results_kept`), else the group's own (they go to the sidecar as the group ends).
    Refuses, before any data is read, what cannot fit even one pair."""
    streamed = results_on_device and not results_kept

    def cost(group, ms, dtype) -> int:
        return group_bytes(group, d, ms, dtype, batch_tokens) + (held_maps(len(group), d, ms) if streamed else 0)

    def fits(ms, dtype, n_pairs=len(pairs)) -> tuple[int, int]:
        held = held_maps(n_pairs, d, ms) if results_on_device and results_kept else 0
        return max(cost([p], ms, dtype) for p in pairs) + held, budget - held

    need, room = fits(methods, stats_dtype)
    if need > budget:
        fixes = ["fewer --pairs"] if fits(methods, stats_dtype, 1)[0] <= budget < need else []
        if stats_dtype == "float64" and fits(methods, "float32")[0] <= budget:
            fixes.append("--stats-dtype float32")
        if "exact" in methods and fits(["adagrad"], stats_dtype)[0] <= budget:
            fixes.append("--method adagrad")
        raise UserError(f"the NPL fit needs {human(need)} for one layer pair (d_ffn {d}) but {where} is "
                        f"{human(budget)}; use " + ", ".join(fixes + ["a device with more memory"])
                        + f" (or set {MEMORY_ENV}, in bytes)")
    groups: list[list[tuple[int, int]]] = [[]]
    for p in pairs:
        if groups[-1] and cost(groups[-1] + [p], methods, stats_dtype) > room:
            groups.append([])
        groups[-1].append(p)
    return groups


def plan_fit(lm, pairs, options, device, seq_len: int, limits: MemoryLimits | None = None,
             results_kept: bool = True) -> list[list[tuple[int, int]]]:
    """plan_groups for this model, device and its free memory (memory_budget); `options`: a fit.FitOptions;
    `results_kept`: every pair's maps stay in memory to the end (else they go to the sidecar per group)."""
    device = torch.device(device)
    batch_tokens = options.forward_batch(seq_len)
    budget, where = memory_budget(lm, device, options.memory, batch_tokens, limits, seq_len)
    return plan_groups(sorted(set(pairs)), lm.adapter.d_ffn, options.methods(), options.stats_dtype, batch_tokens,
                       budget, where, results_on_device=device.type == "cpu", results_kept=results_kept)


# --- where the model's layers go ---------------------------------------------------------------------------
def _sizes(lm, seq_len: int, batch_tokens: int):
    """(WeightSizes, RecordSizes) of an NPL pass: no statistics of its own in the runner's terms, one batch's
    hidden states in flight (a pass goes batch by batch through every layer)."""
    from ffnscope.engine.model.plan import RecordSizes, weight_sizes

    config, embed = lm.config, lm.model.get_input_embeddings().weight
    r = RecordSizes(d_model=int(embed.shape[1]), d_ffn=lm.adapter.d_ffn, seq_len=int(seq_len), recorded_layers=0,
                    topk=0, samples=0, batch_tokens=int(batch_tokens), shard_tokens=int(batch_tokens),
                    heads=getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1),
                    hidden_itemsize=embed.element_size())
    return weight_sizes(lm), r


def host_floor(lm, seq_len: int, batch_tokens: int) -> int:
    """Host bytes an NPL pass on the CPU needs with no layer resident: the weights outside the layers and a
    layer being read (a model loaded whole: all of it), the runtime, a batch's workspace and hidden states."""
    from ffnscope.engine.model.plan import host_other_bytes, host_weight_bytes

    w, r = _sizes(lm, seq_len, batch_tokens)
    return host_weight_bytes(w, "cpu", 0) + host_other_bytes(r, "cpu") + r.shard_hidden_bytes


def runner_resident(lm, device: torch.device, batch_tokens: int, seq_len: int, reserve: int = 0,
                    limits: MemoryLimits | None = None, host_reserve: int = 0, what: str = "its own data") -> int:
    """Leading layers an NPL pass keeps resident on `device`, the rest streamed (engine.model.plan.plan, as a
    recording plans them). `reserve`: bytes the job holds on the device itself (its matrices), `host_reserve`:
    in host memory (maps); on the CPU both are host memory. Without limits: every layer on the CPU, what the
    GPU's free memory holds beside the reserve on a GPU."""
    from ffnscope.engine.model.plan import DEVICE_SHARE, device_workspace, plan

    limits = limits or MemoryLimits()
    w, r = _sizes(lm, seq_len, batch_tokens)
    device_memory, free, host = limits.device, None, limits.host
    if device.type == "cuda":
        free = accelerator.runtime.mem_get_info(device)[0]
        if device_memory is None:
            device_memory = int(free * DEVICE_SHARE) - device_workspace(r.batch_tokens, r.d_model, r.d_ffn) - reserve
        elif device_memory + reserve > free:
            raise UserError(f"--device-memory {human(device_memory)} and {what} ({human(reserve)}) are above the "
                            f"{human(free)} free on {device}; ask for {human(max(free - reserve, 0))} or less")
        host = None  # checked below, on the plan's host bytes
    elif host is not None:
        floor, own = host_floor(lm, seq_len, batch_tokens), reserve + host_reserve
        if host < floor + own:
            raise UserError(f"--host-memory {human(host)} does not hold {what} ({human(own)}) beside the model's "
                            f"smallest plan ({human(floor)}); raise it")
        host -= own
    memory = plan(w, r, device.type, device_memory, host, free)
    if device.type == "cuda" and limits.host is not None and memory.host_bytes + host_reserve > limits.host:
        raise UserError(f"--host-memory {human(limits.host)} does not hold {what} ({human(host_reserve)}) beside "
                        f"the weights and runtime kept there ({human(memory.host_bytes)}); raise it")
    return memory.resident
