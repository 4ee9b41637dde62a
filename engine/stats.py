"""Per-layer neuron statistics, accumulated batch by batch and handed to the host once per layer and
shard. Nothing of size tokens x d_ffn outlives a batch.

Two formulations of the same numbers: torch ops on the device (GPUs, and the reference), and a
fused single-pass numba kernel on CPUs, where memory passes dominate (engine.cpu_kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache.state import NGRAM_ORDERS, LayerState, Sparse

try:
    from engine import cpu_kernels
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
        self._taus = torch.tensor(taus, dtype=torch.float32)
        self.samples: list[torch.Tensor] = []
        self.ngram_counted = ngram_counted
        if ngram_counted is not None:
            self._counted = torch.as_tensor(np.flatnonzero(ngram_counted), device=acc_device)
            self._pairs: dict[int, list[Sparse]] = {n: [] for n in NGRAM_ORDERS}

    @torch.inference_mode()
    def update(self, g: torch.Tensor, act: torch.Tensor, ctx: BatchContext) -> None:
        """g, act: (tokens, d_ffn) in the model's dtype; act is what the firing rule thresholds."""
        if len(ctx.sample_rows):
            self.samples.append(g[ctx.sample_rows].to(torch.float16).cpu())
        if self.fused:
            seq_max, seq_arg = self._update_fused(g, act, ctx)
        else:
            seq_max, seq_arg = self._update_torch(g, act, ctx)
        self._merge_topk(seq_max, seq_arg + ctx.seq_start.to(seq_arg.device)[:, None])

    def _update_torch(self, g, act, ctx):
        g32 = g.float()
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
            self._add_pairs(rows, self._counted[cols], ctx)
        return g32.view(-1, self.seq_len, self.d_ffn).max(dim=1)

    def _update_fused(self, g, act, ctx):
        g32 = g.float().contiguous().numpy()
        a32 = g32 if act is g else act.float().contiguous().numpy()
        n_seqs = g32.shape[0] // self.seq_len
        seq_max = np.empty((n_seqs, self.d_ffn), np.float32)
        seq_arg = np.empty((n_seqs, self.d_ffn), np.int64)
        batch_fires = np.empty(self.d_ffn, np.int64)
        cpu_kernels.batch_stats(g32, a32, self._taus.numpy(), self.primary, self.seq_len,
                                self.fire_count.numpy(), self.g_sum.numpy(), self.g_sumsq.numpy(),
                                self.g_max.numpy(), self.pos_fire.numpy(), seq_max, seq_arg, batch_fires)
        if self.ngram_counted is not None:
            fires = np.where(self.ngram_counted, batch_fires, 0)
            offsets = np.concatenate([[0], np.cumsum(fires)[:-1]])
            rows = np.empty(int(fires.sum()), np.int64)
            cols = np.empty_like(rows)
            cpu_kernels.firing_pairs(a32, np.float32(self.taus[self.primary]), self.ngram_counted,
                                     offsets, rows, cols)
            self._add_pairs(torch.from_numpy(rows), torch.from_numpy(cols), ctx)
        return torch.from_numpy(seq_max), torch.from_numpy(seq_arg)

    def _merge_topk(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Running top-k over sequences: each sequence offers its strongest position per neuron."""
        values = torch.cat([self.topk_value, values.to(self.topk_value.device)])
        indices = torch.cat([self.topk_index, indices.to(self.topk_index.device)])
        self.topk_value, order = values.topk(self.k, dim=0)
        self.topk_index = indices.gather(0, order)

    def _add_pairs(self, rows: torch.Tensor, neurons: torch.Tensor, ctx: BatchContext) -> None:
        """Count (n-gram, neuron) pairs of the fires at (row, neuron)."""
        rows, neurons = rows.to(ctx.gram_keys[1].device), neurons.to(ctx.gram_keys[1].device)
        for n in NGRAM_ORDERS:
            valid = ctx.gram_valid[n][rows]
            grams = ctx.gram_keys[n][rows[valid]]
            if not len(grams):
                continue
            gram_ids, gram_of = torch.unique(grams, return_inverse=True)
            pair, count = torch.unique(gram_of * self.d_ffn + neurons[valid], return_counts=True)
            self._pairs[n].append(Sparse(gram_ids[pair // self.d_ffn].cpu().numpy(),
                                         (pair % self.d_ffn).to(torch.int32).cpu().numpy(),
                                         count.cpu().numpy()))

    def to_host(self) -> LayerState:
        value = self.topk_value.cpu().numpy()
        index = self.topk_index.cpu().numpy()
        index[~np.isfinite(value)] = -1
        state = LayerState(self.fire_count.cpu().numpy(), self.g_sum.cpu().numpy(),
                           self.g_sumsq.cpu().numpy(), self.g_max.cpu().numpy(),
                           self.pos_fire.to(torch.int32).cpu().numpy(), value, index)
        if self.ngram_counted is not None:
            state.ngram_counted = self.ngram_counted.copy()
            state.ngrams = {n: Sparse.reduce(parts) for n, parts in self._pairs.items()}
        return state

    def take_samples(self) -> np.ndarray:
        if not self.samples:
            return np.zeros((0, self.d_ffn), np.float16)
        return torch.cat(self.samples).numpy()
