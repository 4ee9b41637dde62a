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
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import MapRecord
from ffnscope.engine.jobs.stop import StopToken
from ffnscope.engine.model.batches import seq_batches
from ffnscope.engine.npl.capture import GCapture, as_ids, make_runner, run_layers, token_nll

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


# --- exact fit: streamed sufficient statistics -------------------------------------------------------
def _colsum(x: torch.Tensor) -> torch.Tensor:
    """Column sums as a matrix-vector product (far faster than a dim-0 reduction on CPU)."""
    return torch.ones(x.shape[0], dtype=x.dtype, device=x.device) @ x


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
            self.sum[k].add_(_colsum(x))
        if k in self.xx:
            _add_gram_upper(self.xx[k], x, self.block)

    def cross(self, i: int, j: int, gi: torch.Tensor, gj: torch.Tensor) -> None:
        x, y = self._centered(i, gi), self._centered(j, gj)
        self.xy[(i, j)].add_(x.T @ y)

    def drop(self, k: int) -> None:
        buf = self._shifted.pop(k, None)
        if buf is not None:
            self._pool.append(buf)

    def solve(self, ridge: float) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        out = {}
        for i in self.sources:
            mx = self.sum[i] / self.n
            upper = torch.triu(self.xx[i])
            cxx = upper + torch.triu(upper, 1).T - self.n * torch.outer(mx, mx)
            lam = ridge * float(torch.diagonal(cxx).sum()) / self.d
            a = cxx + lam * torch.eye(self.d, dtype=torch.float64, device=self.device)
            chol, info = torch.linalg.cholesky_ex(a)
            for (si, j) in self.pairs:
                if si != i:
                    continue
                my = self.sum[j] / self.n
                cxy = self.xy[(i, j)] - self.n * torch.outer(mx, my)
                if int(info) == 0:
                    w = torch.cholesky_solve(cxy, chol)
                else:  # singular (dead neurons, ridge 0): the minimum-norm least-squares solution
                    w = torch.from_numpy(np.linalg.lstsq(a.cpu().numpy(), cxy.cpu().numpy(), rcond=None)[0]).to(a)
                b = (self.shift[j] + my) - (self.shift[i] + mx) @ w
                out[(i, j)] = (w.cpu().numpy(), b.cpu().numpy())
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
        grads = ((self.W, self.sum_W, (x.T @ err).mul_(scale)), (self.b, self.sum_b, _colsum(err).mul_(scale)))
        for param, acc, grad in grads:
            acc.addcmul_(grad, grad)
            param.addcdiv_(grad, acc.sqrt().add_(self.eps), value=-self.lr)
        self.steps += 1


# --- held-out metrics ---------------------------------------------------------------------------------
class Metrics:
    """Streamed held-out metrics of one map: per batch in the data's dtype on data shifted by the
    target's fit mean, summed into float64."""

    def __init__(self, d: int, shift: torch.Tensor):
        self.shift = shift.double()
        z = lambda: torch.zeros(d, dtype=torch.float64, device=shift.device)  # noqa: E731
        self.n = 0
        self.se, self.sp, self.sa, self.spp, self.saa, self.spa = z(), z(), z(), z(), z(), z()
        self.token_l2 = 0.0

    def update(self, pred: torch.Tensor, actual: torch.Tensor) -> None:
        dtype = torch.promote_types(pred.dtype, actual.dtype)
        shift = self.shift.to(dtype)
        p, a = pred.to(dtype) - shift, actual.to(dtype) - shift
        e = p - a
        self.n += p.shape[0]
        self.token_l2 += float(torch.linalg.vector_norm(e, dim=1).double().sum())
        self.se += _colsum(e.mul_(e)).double()
        self.sp += _colsum(p).double()
        self.sa += _colsum(a).double()
        self.spp += _colsum(p * p).double()
        self.saa += _colsum(a * a).double()
        self.spa += _colsum(p.mul_(a)).double()

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        n = max(self.n, 1)
        mp, ma = self.sp / n, self.sa / n
        var_p = (self.spp / n - mp * mp).clamp_min(0)
        var_a = (self.saa / n - ma * ma).clamp_min(0)
        cov = self.spa / n - mp * ma
        denom = torch.sqrt(var_p * var_a)
        tiny = 1e-12 * float(var_a.mean()) if float(var_a.mean()) > 0 else 0.0
        r = torch.where(denom > tiny, cov / denom.clamp_min(1e-300), torch.full_like(cov, float("nan")))
        metrics = {"pearson": r.clamp(-1, 1).cpu().numpy(), "l2": torch.sqrt(self.se / n).cpu().numpy(),
                   "target_mean": (self.shift + ma).cpu().numpy(), "target_var": var_a.cpu().numpy()}
        d = self.se.shape[0]
        total_var = float(var_a.sum())
        finite = metrics["pearson"][np.isfinite(metrics["pearson"])]
        scalars = {"n_heldout": float(self.n), "token_l2": self.token_l2 / n, "mse": float(self.se.sum()) / (n * d),
                   "fvu": float(self.se.sum()) / (n * total_var) if total_var > 0 else float("nan"),
                   "mean_pearson": float(finite.mean()) if finite.size else float("nan")}
        return metrics, scalars


# --- the pass ---------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    pairs: list[tuple[int, int]]
    maps: dict[str, dict[tuple[int, int], MapRecord]]
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        return now


def _report(on_progress, phase: str, done: int, total: int, started: float) -> None:
    if on_progress is None:
        return
    elapsed = time.time() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    on_progress(dict(phase=phase, tokens_done=int(done), tokens_total=int(total), tokens_per_s=rate,
                     eta_s=(total - done) / rate if rate > 0 else None))


def fit_maps(lm, fit_tokens: np.ndarray, heldout_tokens: np.ndarray, pairs: list[tuple[int, int]],
             options: FitOptions | None = None, device: torch.device | str = "cpu", on_progress=None,
             stop: StopToken | None = None) -> FitResult:
    """Fit M_{i->j} for `pairs` on fit_tokens (n, seq_len) and score them on heldout_tokens.

    on_progress(dict(phase, tokens_done, tokens_total, tokens_per_s, eta_s)) is called per batch;
    a requested `stop` makes it raise engine.jobs.stop.Stopped at the next layer."""
    stop = stop or StopToken()
    options = options or FitOptions()
    options.check()
    methods = options.methods()
    device = torch.device(device)
    adapter = lm.adapter
    n_layers, d = len(adapter.layers), adapter.d_ffn
    pairs = sorted(set((int(i), int(j)) for i, j in pairs))
    if not pairs:
        raise UserError("no NPL pair to fit")
    needed = sorted({k for p in pairs for k in p})
    last_use = {k: max(max(p) for p in pairs if k in p) for k in needed}
    seq_len = fit_tokens.shape[1]
    batch_tokens = (max(1, round(options.adagrad_tokens / seq_len)) * seq_len if "adagrad" in methods
                    else options.batch_tokens)
    runner = make_runner(lm, device, batch_tokens)
    hooks = GCapture(adapter, needed)
    clock = _Clock(device)
    exact = ExactFit(pairs, d, device, options.stats_dtype) if "exact" in methods else None
    adagrad = {p: AdagradMap(d, d, device, options.lr) for p in pairs} if "adagrad" in methods else {}
    total = int(fit_tokens.size + heldout_tokens.size)
    started = time.time()

    with torch.inference_mode(), hooks.attached():
        # pass 1: the fit sequences
        for lo, hi in seq_batches(len(fit_tokens), seq_len, batch_tokens):
            stop.check()
            t = time.perf_counter()
            hidden = runner.embed(as_ids(fit_tokens[lo:hi]))
            t = clock.add("forward", t)
            if exact is not None:
                exact.begin_batch((hi - lo) * seq_len)
            kept: dict[int, torch.Tensor] = {}
            for k in range(needed[-1] + 1):
                stop.check()
                t = time.perf_counter()
                hidden = runner.run(k, hidden, runner.weights(k))
                t = clock.add("forward", t)
                if k not in last_use:
                    continue
                kept[k] = hooks.g.pop(k).reshape(-1, d)
                ready = [p for p in pairs if max(p) == k]
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
            _report(on_progress, "fitting", hi * seq_len, total, started)

        maps: dict[str, dict[tuple[int, int], MapRecord]] = {}
        solved = {}
        if exact is not None:
            t = time.perf_counter()
            solved["exact"] = exact.solve(options.ridge)
            clock.add("exact_solve", t)
            clock.add("exact", t)
        if adagrad:
            solved["adagrad"] = {p: (m.W.double().cpu().numpy(), m.b.double().cpu().numpy())
                                 for p, m in adagrad.items()}
        if on_progress is not None:
            on_progress(dict(phase="solving", tokens_done=int(fit_tokens.size), tokens_total=total))

        # pass 2: held-out sequences, every layer and the LM head (the unmodified model's loss)
        shifts = exact.shift if exact is not None else {}
        weights = {m: {p: (torch.as_tensor(w, dtype=torch.float32, device=device),
                           torch.as_tensor(b, dtype=torch.float32, device=device)) for p, (w, b) in s.items()}
                   for m, s in solved.items()}
        metrics: dict[str, dict[tuple[int, int], Metrics]] = {m: {} for m in solved}
        nll = np.zeros((len(heldout_tokens), max(seq_len - 1, 0)), np.float32)
        for lo, hi in seq_batches(len(heldout_tokens), seq_len, batch_tokens):
            stop.check()
            t = time.perf_counter()
            ids = as_ids(heldout_tokens[lo:hi])
            hidden = runner.embed(ids)
            kept = {}

            def on_layer(k, _out):
                stop.check()
                if k not in last_use:
                    return
                kept[k] = hooks.g.pop(k).reshape(-1, d)
                for i, j in (p for p in pairs if max(p) == k):
                    for method, ws in weights.items():
                        w, b = ws[(i, j)]
                        if (i, j) not in metrics[method]:
                            shift = shifts.get(j)
                            shift = shift if shift is not None else kept[j].double().mean(0)
                            metrics[method][(i, j)] = Metrics(d, shift)
                        metrics[method][(i, j)].update(kept[i] @ w + b, kept[j])
                for m in [m for m in kept if last_use[m] <= k]:
                    del kept[m]

            hidden = run_layers(runner, hidden, 0, n_layers, on_layer)
            nll[lo:hi] = token_nll(adapter, hidden, ids).cpu().numpy()
            clock.add("heldout", t)
            _report(on_progress, "scoring held-out", int(fit_tokens.size) + hi * seq_len, total, started)

    for method, per_pair in solved.items():
        maps[method] = {}
        for (i, j), (w, b) in per_pair.items():
            values, scalars = metrics[method][(i, j)].result() if (i, j) in metrics[method] else ({}, {})
            maps[method][(i, j)] = MapRecord(i, j, w, b, values, scalars)
    return FitResult(pairs, maps, nll, clock.seconds, int(fit_tokens.size), int(heldout_tokens.size),
                     {**asdict(options), "methods": methods, "batch_tokens_used": batch_tokens})
