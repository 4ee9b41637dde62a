"""Where a fit's results go, and their held-out metrics (engine.npl.fit makes them).

A fit hands each map to a sink as its group of pairs is scored (`put(method, MapRecord)`), so memory holds
one group's maps at a time: KeptMaps keeps them all (direct callers, tests), cache.npl_store.NplWriter
writes them into the sidecar being written. `sink.maps` reads them afterwards (method -> pair -> MapRecord;
the writer's from the sidecar, one map at a time).
"""
from __future__ import annotations

import numpy as np
import torch

from ffnscope.cache.npl_store import MapRecord


def colsum(x: torch.Tensor) -> torch.Tensor:
    """Column sums as a matrix-vector product (far faster than a dim-0 reduction on CPU)."""
    return torch.ones(x.shape[0], dtype=x.dtype, device=x.device) @ x


class KeptMaps:
    """A sink that keeps every map in memory: method -> pair -> MapRecord, pairs in order."""

    def __init__(self, methods=()):
        self._maps: dict[str, dict[tuple[int, int], MapRecord]] = {m: {} for m in methods}

    def put(self, method: str, rec: MapRecord) -> None:
        self._maps.setdefault(method, {})[(rec.source, rec.target)] = rec

    @property
    def maps(self) -> dict[str, dict[tuple[int, int], MapRecord]]:
        return {m: dict(sorted(records.items())) for m, records in self._maps.items()}


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
        self.se += colsum(e.mul_(e)).double()
        self.sp += colsum(p).double()
        self.sa += colsum(a).double()
        self.spp += colsum(p * p).double()
        self.saa += colsum(a * a).double()
        self.spa += colsum(p.mul_(a)).double()

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


