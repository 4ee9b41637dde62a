"""Per-layer neuron statistics, accumulated on the device batch by batch, handed to the host once
per layer and shard. Nothing of size tokens x d_ffn outlives a batch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache.state import NGRAM_ORDERS, LayerState, Sparse


@dataclass
class BatchContext:
    """What a batch contributes besides activations; built once per batch, shared by all layers."""
    token_index: torch.Tensor           # (n,) int64 global token index of each flattened token
    gram_keys: dict[int, torch.Tensor]  # n -> (n_tokens,) int64 n-gram key ending at each token
    gram_valid: dict[int, torch.Tensor]  # n -> (n_tokens,) bool: the n-gram avoids the start token
    sample_rows: torch.Tensor           # (s,) rows of this batch in the activation sample
    seq_len: int


class LayerStats:
    def __init__(self, d_ffn: int, seq_len: int, taus: list[float], primary: int, k: int,
                 device: torch.device, ngram_counted: np.ndarray | None):
        self.taus = taus
        self.primary = primary
        self.k = k
        self.fire_count = torch.zeros(len(taus), d_ffn, dtype=torch.int64, device=device)
        self.g_sum = torch.zeros(d_ffn, dtype=torch.float64, device=device)
        self.g_sumsq = torch.zeros(d_ffn, dtype=torch.float64, device=device)
        self.g_max = torch.full((d_ffn,), -torch.inf, device=device)
        self.pos_fire = torch.zeros(seq_len, d_ffn, dtype=torch.int64, device=device)
        self.topk_value = torch.full((k, d_ffn), -torch.inf, device=device)
        self.topk_index = torch.full((k, d_ffn), -1, dtype=torch.int64, device=device)
        self.samples: list[torch.Tensor] = []
        self.ngram_counted = ngram_counted
        if ngram_counted is not None:
            self._counted = torch.as_tensor(np.flatnonzero(ngram_counted), device=device)
            self._pairs: dict[int, list[Sparse]] = {n: [] for n in NGRAM_ORDERS}

    @torch.inference_mode()
    def update(self, g: torch.Tensor, act: torch.Tensor, ctx: BatchContext) -> None:
        """g, act: (tokens, d_ffn) in the model's dtype; act is what the firing rule thresholds."""
        g32 = g.float()
        for i, tau in enumerate(self.taus):
            fires = act > tau
            self.fire_count[i] += fires.sum(0)
            if i == self.primary:
                primary_fires = fires
        self.g_sum += g32.sum(0, dtype=torch.float64)
        self.g_sumsq += (g32 * g32).sum(0, dtype=torch.float64)
        torch.maximum(self.g_max, g32.amax(0), out=self.g_max)
        self.pos_fire += primary_fires.view(-1, ctx.seq_len, primary_fires.shape[1]).sum(0)
        self._update_topk(g32, ctx.token_index)
        if len(ctx.sample_rows):
            self.samples.append(g[ctx.sample_rows].to(torch.float16).cpu())
        if self.ngram_counted is not None:
            self._update_ngrams(primary_fires, ctx)

    def _update_topk(self, g32: torch.Tensor, token_index: torch.Tensor) -> None:
        k = min(self.k, g32.shape[0])
        value, rows = g32.topk(k, dim=0)
        values = torch.cat([self.topk_value, value])
        indices = torch.cat([self.topk_index, token_index[rows]])
        self.topk_value, order = values.topk(self.k, dim=0)
        self.topk_index = indices.gather(0, order)

    def _update_ngrams(self, fires: torch.Tensor, ctx: BatchContext) -> None:
        rows, cols = fires[:, self._counted].nonzero(as_tuple=True)
        neurons = self._counted[cols]
        for n in NGRAM_ORDERS:
            valid = ctx.gram_valid[n][rows]
            grams = ctx.gram_keys[n][rows[valid]]
            if not len(grams):
                continue
            gram_ids, gram_of = torch.unique(grams, return_inverse=True)
            d = fires.shape[1]
            pair, count = torch.unique(gram_of * d + neurons[valid], return_counts=True)
            self._pairs[n].append(Sparse(gram_ids[pair // d].cpu().numpy(),
                                         (pair % d).to(torch.int32).cpu().numpy(),
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

    def take_samples(self, d_ffn: int) -> np.ndarray:
        if not self.samples:
            return np.zeros((0, d_ffn), np.float16)
        return torch.cat(self.samples).numpy()
