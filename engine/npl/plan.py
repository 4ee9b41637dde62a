"""The NPL fit's memory plan: the layer pairs in groups whose matrices fit the device (X^T X alone is
10.9 GB per source layer at d_ffn 36,864), one fit and one scoring pass over the data per group; what
cannot fit even one pair is refused before any data is read."""
from __future__ import annotations

import os

import torch

from ffnscope.cache.errors import UserError
from ffnscope.engine.npl.capture import forward_minimum, forward_workspace
from ffnscope.engine.units import human

MEMORY_ENV = "FFNSCOPE_NPL_MEMORY"  # bytes the NPL fit's matrices may take, instead of the measured free memory


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
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(lm, device: torch.device, option: int | None, batch_tokens: int) -> tuple[int, str]:
    """(bytes the fit's matrices may take, what that is): the option, FFNSCOPE_NPL_MEMORY, else 90% of
    the GPU's free memory less the model's smallest plan, or of the available host memory on a CPU (the
    model's weights are there already) less a forward batch."""
    from ffnscope.engine.model.plan import DEVICE_SHARE
    from ffnscope.engine.units import parse_bytes

    if option is None and os.environ.get(MEMORY_ENV):
        option = parse_bytes(os.environ[MEMORY_ENV], MEMORY_ENV)
    if option is not None:
        return int(option), "the NPL memory budget"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return (int(free * DEVICE_SHARE) - forward_minimum(lm, batch_tokens),
                f"what {device} has free beside the model")
    return int(_mem_available() * 0.9) - forward_workspace(lm, batch_tokens), "the available host memory"


def plan_groups(pairs, d: int, methods, stats_dtype: str, batch_tokens: int, budget: int, where: str,
                results_on_device: bool) -> list[list[tuple[int, int]]]:
    """The pairs (sorted: those of one source stay together, sharing X^T X) in groups that each fit in
    `budget` bytes; on a CPU the float64 maps already fit count too. Refuses, before any data is read,
    what cannot fit even one pair."""
    def fits(ms, dtype, n_pairs=len(pairs)) -> tuple[int, int]:
        held = 8 * d * d * len(ms) * n_pairs if results_on_device else 0
        return max(group_bytes([p], d, ms, dtype, batch_tokens) for p in pairs) + held, budget - held

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
        if groups[-1] and group_bytes(groups[-1] + [p], d, methods, stats_dtype, batch_tokens) > room:
            groups.append([])
        groups[-1].append(p)
    return groups


def plan_fit(lm, pairs, options, device, seq_len: int) -> list[list[tuple[int, int]]]:
    """plan_groups for this model, device and its free memory (memory_budget); `options`: a fit.FitOptions."""
    device = torch.device(device)
    batch_tokens = options.forward_batch(seq_len)
    budget, where = memory_budget(lm, device, options.memory, batch_tokens)
    return plan_groups(sorted(set(pairs)), lm.adapter.d_ffn, options.methods(), options.stats_dtype, batch_tokens,
                       budget, where, results_on_device=device.type == "cpu")
