"""Per-layer neuron statistics, accumulated batch by batch and handed to the host once per layer and
shard. Nothing of size tokens x d_ffn outlives a batch.

Two formulations of the same numbers: torch ops on the device (GPUs, and the reference), and a
fused single-pass numba kernel on CPUs, where memory passes dominate (engine.record.kernels).

Contexts (top-k) rank by act, the quantity the firing rule thresholds (act(gate) for gated FFNs, g
for plain ones), and keep g there, signed. Each sequence offers its strongest position >= 1 per
neuron; position 0 (the start token: the same context in every sequence) competes for one slot of
its own. Ties go to the smaller global token index, as cache.state.merge_topk merges them.

ActScale is the calibration's accumulator for a relative firing rule (each layer's own tau_l).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ffnscope.cache.state import G_ORDERS, NGRAM_ORDERS, LayerState, Samples, Sparse

try:
    from ffnscope.engine.record import kernels as cpu_kernels
except ImportError:  # numba missing on this platform: the torch formulation serves
    cpu_kernels = None


@dataclass
class BatchContext:
    """What a batch contributes besides activations; built once per batch, shared by all layers."""
    seq_start: torch.Tensor             # (sequences,) int64 global token index of each position 0
    gram_keys: dict[int, torch.Tensor]  # n -> (tokens,) int64 key of the n-gram ending at each token
    gram_valid: dict[int, torch.Tensor]  # n -> (tokens,) bool: that n-gram avoids the start token
    sample_rows: torch.Tensor           # (s,) rows of this batch in the activation sample
    seq_len: int


class LayerStats:
    def __init__(self, d_ffn: int, seq_len: int, taus: list[float], primary: int, k: int,
                 device: torch.device, ngram_counted: np.ndarray | None, fused: bool | None = None):
        self.taus = taus
        self.primary = primary
        self.k = k
        self.seq_len = seq_len
        self.d_ffn = d_ffn
        self.fused = (device.type == "cpu" and cpu_kernels is not None) if fused is None else fused
        acc_device = torch.device("cpu") if self.fused else device
        self.fire_count = torch.zeros(len(taus), d_ffn, dtype=torch.int64, device=acc_device)
        self.g_sum = torch.zeros(d_ffn, dtype=torch.float64, device=acc_device)
        self.g_sumsq = torch.zeros(d_ffn, dtype=torch.float64, device=acc_device)
        self.g_max = torch.full((d_ffn,), -torch.inf, device=acc_device)
        self.pos_fire = torch.zeros(seq_len, d_ffn, dtype=torch.int64, device=acc_device)
        self.topk_value = torch.full((k, d_ffn), -torch.inf, device=acc_device)
        self.topk_index = torch.full((k, d_ffn), -1, dtype=torch.int64, device=acc_device)
        self.topk_g = torch.full((k, d_ffn), torch.nan, device=acc_device)
        self.start_value = torch.full((1, d_ffn), -torch.inf, device=acc_device)
        self.start_index = torch.full((1, d_ffn), -1, dtype=torch.int64, device=acc_device)
        self.start_g = torch.full((1, d_ffn), torch.nan, device=acc_device)
        self._taus = torch.tensor(taus, dtype=torch.float32)
        self.samples: list[torch.Tensor] = []
        self.ngram_counted = ngram_counted
        if ngram_counted is not None:
            self._counted = torch.as_tensor(np.flatnonzero(ngram_counted), device=acc_device)
            self._pairs: dict[int, list[Sparse]] = {n: [] for n in NGRAM_ORDERS}

    @torch.inference_mode()
    def update(self, g: torch.Tensor, act: torch.Tensor, ctx: BatchContext) -> None:
        """g, act: (tokens, d_ffn) in the model's dtype; act is what the firing rule thresholds."""
        if len(ctx.sample_rows):  # kept where g is, in its dtype: no host sync per batch on a GPU (take_samples)
            self.samples.append(g[ctx.sample_rows])
        if self.fused:
            g32, a32, seq_max, seq_arg, seq_g = self._update_fused(g, act, ctx)
        else:
            g32, a32, seq_max, seq_arg, seq_g = self._update_torch(g, act, ctx)
        seq_start = ctx.seq_start.to(seq_arg.device)[:, None]
        self.topk_value, self.topk_index, self.topk_g = _merge_topk(
            (self.topk_value, self.topk_index, self.topk_g), (seq_max, seq_arg + seq_start, seq_g), self.k)
        start = a32.view(-1, self.seq_len, self.d_ffn)[:, 0]
        self.start_value, self.start_index, self.start_g = _merge_topk(
            (self.start_value, self.start_index, self.start_g),
            (start, seq_start.expand_as(start), g32.view(-1, self.seq_len, self.d_ffn)[:, 0]), 1)

    def _update_torch(self, g, act, ctx):
        g32 = g.float()
        a32 = g32 if act is g else act.float()
        for i, tau in enumerate(self.taus):
            fires = act > tau
            self.fire_count[i] += fires.sum(0)
            if i == self.primary:
                primary_fires = fires
        self.g_sum += g32.sum(0, dtype=torch.float64)
        self.g_sumsq += (g32 * g32).sum(0, dtype=torch.float64)
        torch.maximum(self.g_max, g32.amax(0), out=self.g_max)
        self.pos_fire += primary_fires.view(-1, self.seq_len, self.d_ffn).sum(0)
        if self.ngram_counted is not None:
            rows, cols = primary_fires[:, self._counted].nonzero(as_tuple=True)
            neurons = self._counted[cols]
            self._add_pairs(rows, neurons, g32[rows, neurons], ctx)
        a3, g3 = a32.view(-1, self.seq_len, self.d_ffn), g32.view(-1, self.seq_len, self.d_ffn)
        if self.seq_len > 1:
            seq_max, seq_arg = a3[:, 1:].max(dim=1)  # the first maximum on ties, as the fused kernel
            seq_arg = seq_arg + 1
            seq_g = g3.gather(1, seq_arg[:, None]).squeeze(1)
        else:
            seq_max = torch.full_like(a3[:, 0], -torch.inf)
            seq_arg = torch.zeros_like(seq_max, dtype=torch.int64)
            seq_g = torch.full_like(seq_max, torch.nan)
        return g32, a32, seq_max, seq_arg, seq_g

    def _update_fused(self, g, act, ctx):
        g32 = g.float().contiguous().numpy()
        a32 = g32 if act is g else act.float().contiguous().numpy()
        n_seqs = g32.shape[0] // self.seq_len
        seq_max = np.empty((n_seqs, self.d_ffn), np.float32)
        seq_arg = np.empty((n_seqs, self.d_ffn), np.int64)
        seq_g = np.empty((n_seqs, self.d_ffn), np.float32)
        batch_fires = np.empty(self.d_ffn, np.int64)
        cpu_kernels.batch_stats(g32, a32, self._taus.numpy(), self.primary, self.seq_len,
                                self.fire_count.numpy(), self.g_sum.numpy(), self.g_sumsq.numpy(),
                                self.g_max.numpy(), self.pos_fire.numpy(), seq_max, seq_arg, seq_g, batch_fires)
        if self.ngram_counted is not None:
            fires = np.where(self.ngram_counted, batch_fires, 0)
            offsets = np.concatenate([[0], np.cumsum(fires)[:-1]])
            rows = np.empty(int(fires.sum()), np.int64)
            cols = np.empty_like(rows)
            g_at = np.empty(len(rows), np.float32)
            cpu_kernels.firing_pairs(a32, g32, np.float32(self.taus[self.primary]), self.ngram_counted,
                                     offsets, rows, cols, g_at)
            self._add_pairs(torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(g_at), ctx)
        return (torch.from_numpy(g32), torch.from_numpy(a32), torch.from_numpy(seq_max), torch.from_numpy(seq_arg),
                torch.from_numpy(seq_g))

    def _add_pairs(self, rows: torch.Tensor, neurons: torch.Tensor, g_at: torch.Tensor, ctx: BatchContext) -> None:
        """Count (n-gram, neuron) pairs of the fires at (row, neuron), and sum g_at (g at each fire)
        per pair for the orders in G_ORDERS. The sums run on the host in the order of the fires
        (rows ascending within a neuron in both formulations), so they agree to the bit."""
        device = ctx.gram_keys[1].device
        rows, neurons = rows.to(device), neurons.to(device)
        for n in NGRAM_ORDERS:
            valid = ctx.gram_valid[n][rows]
            grams = ctx.gram_keys[n][rows[valid]]
            if not len(grams):
                continue
            gram_ids, gram_of = torch.unique(grams, return_inverse=True)
            pair, inverse, count = torch.unique(gram_of * self.d_ffn + neurons[valid], return_inverse=True,
                                                return_counts=True)
            g_sum = None
            if n in G_ORDERS:
                g_sum = np.bincount(inverse.cpu().numpy(), weights=g_at[valid.to(g_at.device)].double().cpu().numpy(),
                                    minlength=len(pair))
            self._pairs[n].append(Sparse(gram_ids[pair // self.d_ffn].cpu().numpy(),
                                         (pair % self.d_ffn).to(torch.int32).cpu().numpy(),
                                         count.cpu().numpy(), g_sum))

    def to_host(self) -> LayerState:
        value, index, g = (a.cpu().numpy() for a in (self.topk_value, self.topk_index, self.topk_g))
        start = [a.cpu().numpy()[0] for a in (self.start_value, self.start_index, self.start_g)]
        for v, i, x in ((value, index, g), start):
            empty = ~np.isfinite(v)
            i[empty], x[empty] = -1, np.nan
        state = LayerState(self.fire_count.cpu().numpy(), self.g_sum.cpu().numpy(),
                           self.g_sumsq.cpu().numpy(), self.g_max.cpu().numpy(),
                           self.pos_fire.to(torch.int32).cpu().numpy(), value, index, g, *start)
        if self.ngram_counted is not None:
            state.ngram_counted = self.ngram_counted.copy()
            state.ngrams = {n: Sparse.reduce(parts, n in G_ORDERS) for n, parts in self._pairs.items()}
        return state

    def take_samples(self) -> np.ndarray:
        """The sampled rows of g, float32 (cache.state.Samples: any finite g, exactly)."""
        if not self.samples:
            return np.zeros((0, self.d_ffn), Samples.DTYPE)
        # one move to the host per layer and shard, in g's dtype (half the bytes of a 16-bit model's)
        return torch.cat(self.samples).cpu().float().numpy()


def _merge_topk(kept: tuple, offered: tuple, k: int) -> tuple:
    """Per column, the k largest values of kept and offered (value, token index, g) triples; ties go
    to the smaller token index, empty slots (index -1) last: cache.state.merge_topk's rule."""
    value, index, g = (torch.cat([a, b.to(a.device)]) for a, b in zip(kept, offered))
    key = torch.where(index < 0, torch.iinfo(torch.int64).max, index)
    by_index = key.argsort(dim=0, stable=True)
    order = by_index.gather(0, (-value.gather(0, by_index)).argsort(dim=0, stable=True))[:k]
    return value.gather(0, order), index.gather(0, order), g.gather(0, order)


class ActScale:
    """Calibration accumulator of a relative firing rule: each neuron's largest act, and the act values
    of every `stride`-th token of the sample (all the layer's neurons; at most about MAX_VALUES values)
    for a quantile."""
    MAX_VALUES = 1 << 22

    def __init__(self, d_ffn: int, n_tokens: int):
        self.stride = max(1, -(-n_tokens * d_ffn // self.MAX_VALUES))
        self.max: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []  # kept where act is (at most MAX_VALUES): no host sync per batch
        self.seen = 0

    @torch.inference_mode()
    def update(self, g: torch.Tensor, act: torch.Tensor, ctx) -> None:
        a = act.float()
        batch_max = a.amax(0)
        self.max = batch_max if self.max is None else torch.maximum(self.max, batch_max)
        self.values.append(a[(-self.seen) % self.stride::self.stride].reshape(-1).clone())  # not a view of act
        self.seen += len(a)

    def tau(self, kind: str, value: float) -> float:
        """The layer's threshold, never below 0 (a relative rule is never laxer than "activated"),
        rounded to 4 significant digits (the same on every device that records a part)."""
        if kind == "quantile":
            values = torch.cat(self.values).cpu().numpy() if self.values else np.zeros(1, np.float32)
            tau = float(np.quantile(values.astype(np.float64), value))
        else:
            tau = value * float(np.median(self.max.cpu().numpy())) if self.max is not None else 0.0
        return float(f"{max(tau, 0.0):.4g}")
