"""NPL maps M_{i->j}: g_j ~ g_i @ W + b, fitted on a pass over data, scored on held-out sequences.

Exact fit (the default): the pass streams sufficient statistics per source layer (count, sum and
X^T X of g_i, shared by every pair with that source) and per pair (X^T Y) into float64 accumulators,
on data shifted by the first batch's mean (so the centering subtracts no large numbers). Each
batch's products are taken in float32 by default (`stats_dtype`; on a 2-core CPU float64 products
made the exact fit slower than the Adagrad recipe, and on most GPUs float64 is far slower still);
float64 products give least squares to rounding (the tests use them). Then it solves the
ridge problem  min sum ||g_j - g_i W - b||^2 + lambda ||W||^2  (intercept not penalized) with a
Cholesky factorization in float64; lambda = ridge * trace(C_xx) / d, with C_xx the centered scatter
matrix, so `ridge` is relative to the mean variance of the source (0 is plain least squares; a
singular system then gets the minimum-norm solution).

The paper's recipe (`method="adagrad"` or "both"): W and b start at zero, Adagrad (lr 0.01,
eps 1e-10, as torch.optim.Adagrad) on the mean squared error, one epoch, batches of whole
sequences of about 10^4 tokens, in data order.

Held-out metrics per pair and method: per neuron the Pearson r between prediction and actual and
the L2 error (root mean squared error over tokens), the target neuron's mean and variance; per
pair the mean L2 distance per token (mean over tokens of ||pred - actual||_2), the mean squared
error (over tokens and neurons: the training loss), the fraction of variance unexplained (fvu) and
the mean Pearson r over neurons with a defined r.

All token positions are used, the start token's included: substitution replaces them all too.

At scale (X^T X alone is 10.9 GB at d_ffn 36,864) the pairs go in groups that fit the device's memory
(engine.npl.plan: FitOptions.memory, else FFNSCOPE_NPL_MEMORY, else measured), one fit and one scoring pass
over the data per group; each pair's statistics depend on its own layers only, so the results are
those of one pass. What cannot fit even one pair is refused before any data is read. Each group's maps
leave memory as the group ends, for a sink (engine.npl.maps: kept in memory, or into the sidecar), and the
model's layers beyond the job's memory limits stream from its files (engine.npl.plan.runner_resident).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import MapRecord
from ffnscope.engine.jobs.stop import StopToken
from ffnscope.engine.model import accelerator
from ffnscope.engine.model.batches import seq_batches
from ffnscope.engine.model.plan import release_freed_memory
from ffnscope.engine.npl.capture import GCapture, PassProgress, as_ids, make_runner, run_layers, token_nll
from ffnscope.engine.npl.maps import KeptMaps, Metrics, colsum
from ffnscope.engine.npl.plan import group_bytes, held_maps, plan_fit

METHODS = ("exact", "adagrad")
STATS_DTYPES = ("float64", "float32")


@dataclass
class FitOptions:
    method: str = "exact"             # "exact", "adagrad" or "both"
    ridge: float = 1e-6               # relative ridge of the exact fit (see the module docstring)
    stats_dtype: str = "float32"      # batch products in float32 (float64: slower, for exactness checks)
    lr: float = 0.01                  # Adagrad
    adagrad_tokens: int = 10_000      # Adagrad batch, rounded to whole sequences
    batch_tokens: int = 8192          # forward batch when only the exact fit runs
    memory: int | None = None         # bytes the fit's matrices may take (default: FFNSCOPE_NPL_MEMORY, or measured)

    def methods(self) -> list[str]:
        if self.method == "both":
            return list(METHODS)
        if self.method not in METHODS:
            raise UserError(f"unknown NPL fit method '{self.method}'; use exact, adagrad or both")
        return [self.method]

    def check(self) -> None:
        self.methods()
        if self.stats_dtype not in STATS_DTYPES:
            raise UserError(f"unknown statistics dtype '{self.stats_dtype}'; use float64 or float32")
        if self.ridge < 0:
            raise UserError("--ridge must be >= 0")
        if self.memory is not None and self.memory <= 0:
            raise UserError("the NPL memory budget must be positive")

    def forward_batch(self, seq_len: int) -> int:
        """Tokens a forward batch takes: Adagrad steps on whole sequences of about adagrad_tokens."""
        if "adagrad" in self.methods():
            return max(1, round(self.adagrad_tokens / seq_len)) * seq_len
        return self.batch_tokens


# --- exact fit: streamed sufficient statistics -------------------------------------------------------
def _add_gram_upper(acc: torch.Tensor, x: torch.Tensor, block: int = 512) -> None:
    """acc += x^T x on and above the diagonal blocks only (the rest of acc is never read): with
    3 column blocks of 512, 6 of the 9 block products, about 2/3 of a full product."""
    d = x.shape[1]
    if x.device.type != "cpu" or d <= block:
        acc.add_(x.T @ x)
        return
    for a in range(0, d, block):
        acc[a:a + block, a:].add_(x[:, a:a + block].T @ x[:, a:])


class ExactFit:
    """Sufficient statistics of all pairs; per batch `begin_batch`, then `layer(k, g)` once per layer,
    and `cross(i, j, g_i, g_j)` for each pair once both are in.

    Each layer's data is shifted by its first batch's mean (rounded to the product dtype, so the
    shift is exactly what was subtracted); batch products are taken in the product dtype and summed
    into float64 accumulators."""

    def __init__(self, pairs: list[tuple[int, int]], d: int, device: torch.device, stats_dtype: str = "float32",
                 block: int = 512):
        self.pairs = list(pairs)
        self.block = block
        self.sources = sorted({i for i, _ in pairs})
        self.d = d
        self.device = device
        self.products = torch.float64 if stats_dtype == "float64" else torch.float32
        self.n = 0
        self.shift: dict[int, torch.Tensor] = {}
        self.sum: dict[int, torch.Tensor] = {}
        self.xx = {i: torch.zeros(d, d, dtype=torch.float64, device=device) for i in self.sources}
        self.xy = {p: torch.zeros(d, d, dtype=torch.float64, device=device) for p in self.pairs}
        self._shifted: dict[int, torch.Tensor] = {}
        self._counted: set[int] = set()
        self._pool: list[torch.Tensor] = []  # shifted-data buffers, reused: no fresh pages every batch

    def _centered(self, k: int, g: torch.Tensor) -> torch.Tensor:
        if k not in self._shifted:
            if k not in self.shift:
                self.shift[k] = g.double().mean(0).to(self.products).double()
                self.sum[k] = torch.zeros(self.d, dtype=torch.float64, device=self.device)
            shape = (g.shape[0], self.d)
            slot = next((n for n, b in enumerate(self._pool) if b.shape == shape), None)
            buf = (torch.empty(shape, dtype=self.products, device=self.device) if slot is None
                   else self._pool.pop(slot))
            self._shifted[k] = torch.sub(g.to(self.products), self.shift[k].to(self.products), out=buf)
        return self._shifted[k]

    def begin_batch(self, n_tokens: int) -> None:
        self.n += n_tokens
        for k in list(self._shifted):
            self.drop(k)
        self._counted = set()

    def layer(self, k: int, g: torch.Tensor) -> None:
        x = self._centered(k, g)
        if k not in self._counted:
            self._counted.add(k)
            self.sum[k].add_(colsum(x))
        if k in self.xx:
            _add_gram_upper(self.xx[k], x, self.block)

    def cross(self, i: int, j: int, gi: torch.Tensor, gj: torch.Tensor) -> None:
        x, y = self._centered(i, gi), self._centered(j, gj)
        self.xy[(i, j)].add_(x.T @ y)

    def drop(self, k: int) -> None:
        buf = self._shifted.pop(k, None)
        if buf is not None:
            self._pool.append(buf)

    def solve(self, ridge: float, on_source=None, consume: bool = False
              ) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """The maps. With `consume` the solved matrices are built in the accumulators (which go), so
        the solve needs about three more d_ffn^2 float64 matrices, not six. on_source() after each source."""
        take = (lambda acc, key: acc.pop(key)) if consume else (lambda acc, key: acc[key].clone())  # noqa: E731
        out = {}
        for i in self.sources:
            mx = self.sum[i] / self.n
            a = take(self.xx, i).triu_()  # the upper triangle mirrored: C_xx, then C_xx + lambda I
            a.add_(torch.triu(a, 1).T)
            a.sub_(torch.outer(mx, mx).mul_(self.n))
            lam = ridge * float(torch.diagonal(a).sum()) / self.d
            a.diagonal().add_(lam)
            chol, info = torch.linalg.cholesky_ex(a)
            for (si, j) in self.pairs:
                if si != i:
                    continue
                my = self.sum[j] / self.n
                cxy = take(self.xy, (i, j)).sub_(torch.outer(mx, my).mul_(self.n))
                if int(info) == 0:
                    w = torch.cholesky_solve(cxy, chol)
                else:  # singular (dead neurons, ridge 0): the minimum-norm least-squares solution
                    w = torch.from_numpy(np.linalg.lstsq(a.cpu().numpy(), cxy.cpu().numpy(), rcond=None)[0]).to(a)
                del cxy
                b = (self.shift[j] + my) - (self.shift[i] + mx) @ w
                out[(i, j)] = (w.cpu().numpy(), b.cpu().numpy())
                del w
            del a, chol
            if on_source is not None:
                on_source()
        return out


# --- the paper's recipe ----------------------------------------------------------------------------
class AdagradMap:
    """One map trained by Adagrad on the mean squared error, exactly as torch.optim.Adagrad
    (lr_decay 0, initial accumulator 0, eps 1e-10) would update W and b."""

    def __init__(self, d_in: int, d_out: int, device: torch.device, lr: float = 0.01, eps: float = 1e-10):
        self.W = torch.zeros(d_in, d_out, device=device)
        self.b = torch.zeros(d_out, device=device)
        self.sum_W = torch.zeros_like(self.W)
        self.sum_b = torch.zeros_like(self.b)
        self.lr, self.eps = lr, eps
        self.steps = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.float(), y.float()
        err = torch.addmm(self.b, x, self.W).sub_(y)
        scale = 2.0 / err.numel()
        grads = ((self.W, self.sum_W, (x.T @ err).mul_(scale)), (self.b, self.sum_b, colsum(err).mul_(scale)))
        for param, acc, grad in grads:
            acc.addcmul_(grad, grad)
            param.addcdiv_(grad, acc.sqrt().add_(self.eps), value=-self.lr)
        self.steps += 1


# --- the passes -----------------------------------------------------------------------------------------
@dataclass
class FitResult:
    pairs: list[tuple[int, int]]
    maps: Mapping[str, Mapping[tuple[int, int], MapRecord]]  # the sink's view (read lazily from a sidecar)
    heldout_nll: np.ndarray            # (n_heldout, seq_len - 1) float32: the unmodified model's loss
    seconds: dict[str, float]          # forward, exact (statistics + solve), exact_solve, adagrad, heldout
    fit_tokens: int
    heldout_tokens: int
    options: dict = field(default_factory=dict)


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def add(self, name: str, since: float) -> float:
        accelerator.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        return now


def _uses(group) -> dict[int, int]:
    """Layer -> the last layer of a pair that needs it (its g can go after that)."""
    return {k: max(max(p) for p in group if k in p) for p in group for k in p}


def _fit_pass(lm, runner, group, tokens, options: FitOptions, batch_tokens: int, clock, progress, stop):
    """Pass 1, over the fit sequences, for one group of pairs, and the solve: (method -> pair -> (W, b),
    each layer's shift)."""
    d, methods, device, seq_len = lm.adapter.d_ffn, options.methods(), runner.device, tokens.shape[1]
    last_use = _uses(group)
    hooks = GCapture(lm.adapter, last_use)
    exact = ExactFit(group, d, device, options.stats_dtype) if "exact" in methods else None
    adagrad = {p: AdagradMap(d, d, device, options.lr) for p in group} if "adagrad" in methods else {}
    with hooks.attached():
        for lo, hi in seq_batches(len(tokens), seq_len, batch_tokens):
            stop.check()
            t = time.perf_counter()
            hidden = runner.embed(as_ids(tokens[lo:hi]))
            t = clock.add("forward", t)
            if exact is not None:
                exact.begin_batch((hi - lo) * seq_len)
            kept: dict[int, torch.Tensor] = {}
            for k in range(max(last_use) + 1):
                stop.check()
                t = time.perf_counter()
                hidden = runner.run(k, hidden, runner.weights(k))
                t = clock.add("forward", t)
                if k in last_use:
                    kept[k] = hooks.g.pop(k).reshape(-1, d)
                    ready = [p for p in group if max(p) == k]
                    if exact is not None:
                        exact.layer(k, kept[k])
                        for i, j in ready:
                            exact.cross(i, j, kept[i], kept[j])
                        t = clock.add("exact", t)
                    for i, j in ready if adagrad else ():
                        adagrad[(i, j)].step(kept[i], kept[j])
                    t = clock.add("adagrad", t) if adagrad else t
                    for m in [m for m in kept if last_use[m] <= k]:
                        del kept[m]
                        if exact is not None:
                            exact.drop(m)
                progress.step((hi - lo) * seq_len, "fitting")
    solved = {}
    if exact is not None:
        progress.step(phase="solving")
        t = time.perf_counter()
        solved["exact"] = exact.solve(options.ridge, progress.step, consume=True)
        clock.add("exact_solve", t)
        clock.add("exact", t)
    if adagrad:  # to the host first: no float64 copy on the device
        solved["adagrad"] = {p: (m.W.cpu().double().numpy(), m.b.cpu().double().numpy()) for p, m in adagrad.items()}
    return solved, (exact.shift if exact is not None else {})


def _score_pass(lm, runner, group, tokens, batch_tokens: int, solved, shifts, metrics, nll, clock, progress,
                stop) -> None:
    """Pass 2, over the held-out sequences: the group's metrics into `metrics`, and where `nll` is
    given, the unmodified model's loss (every layer and the LM head)."""
    adapter, d, device, seq_len = lm.adapter, lm.adapter.d_ffn, runner.device, tokens.shape[1]
    last_use = _uses(group)
    n_run = len(adapter.layers) if nll is not None else max(last_use) + 1
    weights = {m: {p: (torch.as_tensor(s[p][0], dtype=torch.float32, device=device),
                       torch.as_tensor(s[p][1], dtype=torch.float32, device=device)) for p in group}
               for m, s in solved.items()}
    hooks = GCapture(adapter, last_use)
    with hooks.attached():
        for lo, hi in seq_batches(len(tokens), seq_len, batch_tokens):
            stop.check()
            t = time.perf_counter()
            ids = as_ids(tokens[lo:hi])
            hidden = runner.embed(ids)
            kept = {}

            def on_layer(k, _out):
                stop.check()
                progress.step((hi - lo) * seq_len, "scoring held-out")
                if k not in last_use:
                    return
                kept[k] = hooks.g.pop(k).reshape(-1, d)
                for i, j in (p for p in group if max(p) == k):
                    for method, ws in weights.items():
                        w, b = ws[(i, j)]
                        if (i, j) not in metrics[method]:
                            shift = shifts.get(j)
                            shift = shift if shift is not None else kept[j].double().mean(0)
                            metrics[method][(i, j)] = Metrics(d, shift)
                        metrics[method][(i, j)].update(kept[i] @ w + b, kept[j])
                for m in [m for m in kept if last_use[m] <= k]:
                    del kept[m]

            hidden = run_layers(runner, hidden, 0, n_run, on_layer)
            if nll is not None:
                nll[lo:hi] = token_nll(adapter, hidden, ids).cpu().numpy()
                progress.step((hi - lo) * seq_len)
            clock.add("heldout", t)


def fit_maps(lm, fit_tokens: np.ndarray, heldout_tokens: np.ndarray, pairs: list[tuple[int, int]],
             options: FitOptions | None = None, device: torch.device | str = "cpu", on_progress=None,
             stop: StopToken | None = None, groups: list[list[tuple[int, int]]] | None = None,
             sink=None, limits=None) -> FitResult:
    """Fit M_{i->j} for `pairs` on fit_tokens (n, seq_len) and score them on heldout_tokens.

    The pairs go in `groups` (default: plan_fit's for the device's memory), one fit and one scoring pass
    each; every pair's results are those of a single pass. Each group's maps go to `sink` (engine.npl.maps;
    default: KeptMaps) as the group ends; the result's `maps` is the sink's view. `limits`
    (engine.npl.plan.MemoryLimits): the job's --device-memory / --host-memory; layers beyond them stream.
    on_progress(dict(phase, tokens_done, tokens_total, tokens_per_s, eta_s, and group, n_groups when there
    are several)) is called after every layer run, tokens counted once per pass; a requested `stop` raises
    Stopped at the next layer."""
    stop = stop or StopToken()
    options = options or FitOptions()
    options.check()
    methods = options.methods()
    device = torch.device(device)
    n_layers, d = len(lm.adapter.layers), lm.adapter.d_ffn
    pairs = sorted(set((int(i), int(j)) for i, j in pairs))
    if not pairs:
        raise UserError("no NPL pair to fit")
    kept = sink is None
    sink = KeptMaps(methods) if kept else sink
    seq_len = fit_tokens.shape[1]
    batch_tokens = options.forward_batch(seq_len)
    groups = groups or plan_fit(lm, pairs, options, device, seq_len, limits, results_kept=kept)
    lasts = [max(k for p in g for k in p) + 1 for g in groups]  # layers each group's passes run
    units = (fit_tokens.size + heldout_tokens.size) * sum(lasts) + heldout_tokens.size * (n_layers + 1 - lasts[0])
    progress = PassProgress(on_progress, len(groups) * (fit_tokens.size + heldout_tokens.size), units,
                            "placing model")
    progress.step()
    reserve = max(group_bytes(g, d, methods, options.stats_dtype, batch_tokens) for g in groups)
    maps_held = held_maps(len(pairs) if kept else max(len(g) for g in groups), d, methods)  # float64, host
    runner = make_runner(lm, device, batch_tokens, reserve, limits, seq_len, maps_held, "the fit's matrices and maps")
    clock = _Clock(device)
    nll = np.zeros((len(heldout_tokens), max(seq_len - 1, 0)), np.float32)
    with torch.inference_mode():
        for number, group in enumerate(groups):
            if len(groups) > 1:
                progress.extra.update(group=number + 1, n_groups=len(groups))
            found, shifts = _fit_pass(lm, runner, group, fit_tokens, options, batch_tokens, clock, progress, stop)
            metrics: dict[str, dict[tuple[int, int], Metrics]] = {m: {} for m in methods}
            _score_pass(lm, runner, group, heldout_tokens, batch_tokens, found, shifts, metrics,
                        nll if number == 0 else None, clock, progress, stop)
            for method, per_pair in found.items():
                for pair in sorted(per_pair):
                    w, b = per_pair.pop(pair)  # each map leaves memory once the sink has it
                    values, scalars = metrics[method][pair].result() if pair in metrics[method] else ({}, {})
                    sink.put(method, MapRecord(pair[0], pair[1], w, b, values, scalars))
                    del w, b
            del found, shifts, metrics
            release_freed_memory()  # the group's matrices and maps: glibc would keep their pages otherwise
    return FitResult(pairs, sink.maps, nll, clock.seconds, int(fit_tokens.size), int(heldout_tokens.size),
                     {**asdict(options), "methods": methods, "batch_tokens_used": batch_tokens,
                      "pair_groups": len(groups)})
