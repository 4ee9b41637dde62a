"""Per-layer neuron statistics, accumulated batch by batch and handed to the host once per layer and
shard. Nothing of size tokens x d_ffn outlives a batch (the n-gram fires kept on a device: a share of it).

Two formulations of the same numbers: torch ops on the device (GPUs, and the reference), and a
fused single-pass numba kernel on CPUs, where memory passes dominate (engine.record.kernels).

Contexts (top-k) rank by act, the quantity the firing rule thresholds (act(gate) for gated FFNs, g
for plain ones), and keep g there, signed. Each sequence offers its strongest position >= 1 per
neuron; position 0 (the start token: the same context in every sequence) competes for one slot of
its own. Ties go to the smaller global token index, as cache.state.merge_topk merges them.

N-gram pairs in the torch formulation make no host synchronization per batch: each batch's fires at counted
neurons are compacted to a fixed capacity (torch.nonzero_static, row-major: the order nonzero gives), kept on
the device with g at them and their count until the layer's end (to_host): there the device sorts them into
pairs a few batches at a time (chunk_pairs), which the host sums to what the per-batch pairs would give, to
the bit. A batch with more fires than the capacity sets pairs_overflowed: that layer's pairs are incomplete,
and LayerStats(..., exact_pairs=True) records them batch by batch instead (a host read per batch).

ActScale is the calibration's accumulator for a relative firing rule (each layer's own tau_l).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ffnscope.cache.state import G_ORDERS, NGRAM_ORDERS, LayerState, Samples, Sparse
from ffnscope.engine.model.plan import default_pair_capacity
from ffnscope.engine.record.grams import GramTable

try:
    from ffnscope.engine.record import kernels as cpu_kernels
except ImportError:  # numba missing on this platform: the torch formulation serves
    cpu_kernels = None


PAIR_CHUNK = 4         # batches' capacity of kept fires made into pairs at once at the layer's end: their sorts'
                       # transient (about 70 bytes a fire) stays below one batch's workspace (plan.device_workspace)


def chunk_pairs(tokens: torch.Tensor, neurons: torch.Tensor, g_at: torch.Tensor, batch: torch.Tensor, n_batches: int,
                keys: dict, valid: dict, d_ffn: int) -> dict[int, Sparse]:
    """The (n-gram, neuron) pairs of consecutive batches' fires at (token, neuron), given in batch order (`batch`:
    each one's batch) and within a batch rows ascending for each neuron; keys, valid: order -> per token of those
    batches, as BatchContext's; all on one device, which sorts (a few host reads). -> order -> a Sparse part: for
    the orders in G_ORDERS a row per pair and batch, g summed in the fires' order (np.bincount adds in order).
    Sparse.reduce of the parts of consecutive chunks, in order, gives to the bit what the per-batch parts
    (LayerStats._add_pairs) give."""
    out = {}
    for n in NGRAM_ORDERS:
        ok = valid[n][tokens]
        grams, gram_of = torch.unique(keys[n], return_inverse=True)  # these batches' n-grams: pair keys stay small
        key = gram_of[tokens[ok]] * d_ffn + neurons[ok]
        if n in G_ORDERS:  # stably by (pair, batch): each batch's fires of a pair stay in their order
            key, order = torch.sort(key * n_batches + batch[ok], stable=True)
            key, g = key.cpu().numpy(), g_at[ok][order].cpu().double().numpy()
            new = np.diff(key, prepend=-1) != 0
            g_sum = np.bincount(np.cumsum(new) - 1, weights=g)
            pair, count = key[new] // n_batches, np.diff(np.r_[np.flatnonzero(new), len(key)])
        else:
            pair, count = (t.cpu().numpy() for t in torch.unique(key, return_counts=True))
            g_sum = None
        out[n] = Sparse(grams.cpu().numpy()[pair // d_ffn], (pair % d_ffn).astype(np.int32), count, g_sum)
    return out


@dataclass
class BatchContext:
    """What a batch contributes besides activations; built once per batch, shared by all layers (a LayerStats
    keeps it until the layer's end)."""
    seq_start: torch.Tensor             # (sequences,) int64 global token index of each position 0
    gram_keys: dict[int, torch.Tensor]  # n -> (tokens,) int64 key of the n-gram ending at each token
    gram_valid: dict[int, torch.Tensor]  # n -> (tokens,) bool: that n-gram avoids the start token
    sample_rows: torch.Tensor           # (s,) rows of this batch in the activation sample
    seq_len: int
    gram_table: GramTable | None = None  # its n-grams as the CPU kernel counts pairs (None: made from gram_keys)


class LayerStats:
    """One layer's statistics over the batches of a shard. exact_pairs: n-gram pairs built batch by batch (the
    torch path then reads each batch's fires on the host: on a GPU a synchronization per batch); else kept on
    the device, at most pair_capacity fires a batch (None: default_pair_capacity), see pairs_overflowed. reuse: a
    LayerStats whose to_host was consumed: its accumulators are zeroed and reused (a fresh pos_fire of tens of MB
    pages in anew every layer of every shard; to_host's arrays on the CPU are views of them). samples_out: where
    the sampled rows of g go (float32, as many rows as the batches sample): on the CPU as each batch comes."""

    def __init__(self, d_ffn: int, seq_len: int, taus: list[float], primary: int, k: int,
                 device: torch.device, ngram_counted: np.ndarray | None, fused: bool | None = None,
                 exact_pairs: bool = False, pair_capacity: int | None = None, reuse: LayerStats | None = None,
                 samples_out: np.ndarray | None = None):
        self.taus = taus
        self.primary = primary
        self.k = k
        self.seq_len = seq_len
        self.d_ffn = d_ffn
        self.fused = (device.type == "cpu" and cpu_kernels is not None) if fused is None else fused
        acc_device = torch.device("cpu") if self.fused else device

        def accumulator(name, shape, fill, dtype=torch.float32):
            old = getattr(reuse, name, None)
            if old is not None and old.shape == shape and old.dtype == dtype and old.device == acc_device:
                return old.fill_(fill)
            return torch.full(shape, fill, dtype=dtype, device=acc_device)
        self.fire_count = accumulator("fire_count", (len(taus), d_ffn), 0, torch.int64)
        self.g_sum = accumulator("g_sum", (d_ffn,), 0, torch.float64)
        self.g_sumsq = accumulator("g_sumsq", (d_ffn,), 0, torch.float64)
        self.g_max = accumulator("g_max", (d_ffn,), -torch.inf)
        # int32: a count is at most the shard's sequences; the largest accumulator (positions x neurons)
        self.pos_fire = accumulator("pos_fire", (seq_len, d_ffn), 0, torch.int32)
        self.topk_value = torch.full((k, d_ffn), -torch.inf, device=acc_device)
        self.topk_index = torch.full((k, d_ffn), -1, dtype=torch.int64, device=acc_device)
        self.topk_g = torch.full((k, d_ffn), torch.nan, device=acc_device)
        self.start_value = torch.full((1, d_ffn), -torch.inf, device=acc_device)
        self.start_index = torch.full((1, d_ffn), -1, dtype=torch.int64, device=acc_device)
        self.start_g = torch.full((1, d_ffn), torch.nan, device=acc_device)
        self._taus = torch.tensor(taus, dtype=torch.float32)
        self.samples: list[torch.Tensor] = []
        # the layer's sampled vectors on the host (samples_out, filled as batches come where g is on the CPU)
        self._samples_out = None if samples_out is None else torch.from_numpy(samples_out)
        self._sampled = 0
        self.ngram_counted = ngram_counted
        self._keeps = not (self.fused or exact_pairs)  # the n-gram fires, on the device till the layer's end
        self.pair_capacity = pair_capacity
        self.pairs_overflowed = False  # set by to_host: a batch had more fires than were kept, pairs incomplete
        self.most_fires = 0  # set by to_host: the most fires at counted neurons a batch had (a capacity that fits)
        if ngram_counted is not None:
            self._counted = torch.as_tensor(np.flatnonzero(ngram_counted), device=acc_device)
            self._pairs: dict[int, list[Sparse]] = {n: [] for n in NGRAM_ORDERS}
            self._kept: list[tuple] = []  # per batch on the device: (fires' flat index, g there, count, context)

    @torch.inference_mode()
    def update(self, g: torch.Tensor, act: torch.Tensor, ctx: BatchContext) -> None:
        """g, act: (tokens, d_ffn) in the model's dtype; act is what the firing rule thresholds."""
        n_sampled = len(ctx.sample_rows)
        if n_sampled and self._samples_out is not None and g.device.type == "cpu":
            self._samples_out[self._sampled:self._sampled + n_sampled] = g[ctx.sample_rows]
        elif n_sampled:  # kept where g is, in its dtype: no host sync per batch on a GPU (take_samples)
            self.samples.append(g[ctx.sample_rows])
        self._sampled += n_sampled
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
        self.pos_fire += primary_fires.view(-1, self.seq_len, self.d_ffn).sum(0, dtype=torch.int32)
        if self.ngram_counted is not None and self._keeps:
            self._keep_fires(primary_fires[:, self._counted], g, ctx)
        elif self.ngram_counted is not None:
            rows, cols = primary_fires[:, self._counted].nonzero(as_tuple=True)
            neurons = self._counted[cols]
            self._add_pairs(rows, neurons, g32[rows, neurons], ctx.gram_keys, ctx.gram_valid)
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
        fire_bits = np.empty((len(g32), -(-self.d_ffn // cpu_kernels.STRIPE)), np.uint64)
        cpu_kernels.batch_stats(g32, a32, self._taus.numpy(), self.primary, self.seq_len,
                                self.fire_count.numpy(), self.g_sum.numpy(), self.g_sumsq.numpy(),
                                self.g_max.numpy(), self.pos_fire.numpy(), seq_max, seq_arg, seq_g, batch_fires,
                                fire_bits)
        if self.ngram_counted is not None:
            table = ctx.gram_table or GramTable.of({n: k.numpy() for n, k in ctx.gram_keys.items()},
                                                   {n: v.numpy() for n, v in ctx.gram_valid.items()})
            pairs = cpu_kernels.pair_counts(fire_bits, g32, self.ngram_counted, batch_fires, table)
            for n, part in pairs.items():
                self._pairs[n].append(part)
        return (torch.from_numpy(g32), torch.from_numpy(a32), torch.from_numpy(seq_max), torch.from_numpy(seq_arg),
                torch.from_numpy(seq_g))

    def _keep_fires(self, fires: torch.Tensor, g: torch.Tensor, ctx: BatchContext) -> None:
        """Keep a batch's fires at counted neurons (fires: tokens x counted) on the device, no host sync: the
        first `capacity` in row-major order (an empty slot -1), g there in its dtype (exact in float64) and
        their count; to_host makes their pairs."""
        capacity = default_pair_capacity(*fires.shape) if self.pair_capacity is None else self.pair_capacity
        flat = torch.nonzero_static(fires.reshape(-1), size=min(capacity, fires.numel()), fill_value=-1).squeeze(1)
        width = fires.shape[1]
        g_at = g[flat // width, self._counted[flat % width]]  # an empty slot reads g[-1, the last counted]: unused
        index_dtype = torch.int32 if fires.numel() <= torch.iinfo(torch.int32).max else torch.int64
        self._kept.append((flat.to(index_dtype), g_at, fires.sum(), ctx))

    def _pairs_of_kept(self) -> dict[int, Sparse]:
        """The kept fires' pairs, made on their device PAIR_CHUNK batches' capacity at a time (chunk_pairs) and
        summed on the host in batch order; a batch with more fires than it kept sets pairs_overflowed."""
        kept, self._kept = self._kept, []
        counts = torch.stack([count for _, _, count, _ in kept]).cpu().numpy() if kept else np.zeros(0, np.int64)
        sizes = np.array([len(flat) for flat, _, _, _ in kept], np.int64)
        self.pairs_overflowed |= bool((counts > sizes).any())
        self.most_fires = max(self.most_fires, int(counts.max(initial=0)))
        found = np.minimum(counts, sizes)
        parts: dict[int, list[Sparse]] = {n: [] for n in NGRAM_ORDERS}
        lo = 0
        while lo < len(kept):
            hi = lo + 1
            while hi < len(kept) and found[lo:hi + 1].sum() <= PAIR_CHUNK * sizes.max():
                hi += 1
            for n, part in self._chunk_pairs(kept[lo:hi], found[lo:hi]).items():
                parts[n].append(part)
            lo = hi
        return {n: Sparse.reduce(p, n in G_ORDERS) for n, p in parts.items()}

    def _chunk_pairs(self, kept: list, found: np.ndarray) -> dict[int, Sparse]:
        """chunk_pairs of consecutive batches' kept fires, `found` of each."""
        flat, g_at, _, contexts = zip(*kept)
        device, width = self._counted.device, len(self._counted)
        starts = np.r_[0, np.cumsum([len(f) for f in flat])]
        at = torch.from_numpy(np.concatenate([np.arange(s, s + f) for s, f in zip(starts, found)])).to(device)
        batch = np.repeat(np.arange(len(found)), found)
        token_start = np.r_[0, np.cumsum([len(c.gram_keys[1]) for c in contexts])][batch]
        flat = torch.cat(flat)[at].long()
        tokens, neurons = torch.from_numpy(token_start).to(device) + flat // width, self._counted[flat % width]
        keys, valid = ({n: torch.cat([getattr(c, name)[n] for c in contexts]) for n in NGRAM_ORDERS}
                       for name in ("gram_keys", "gram_valid"))
        return chunk_pairs(tokens, neurons, torch.cat(g_at)[at], torch.from_numpy(batch).to(device), len(found), keys,
                           valid, self.d_ffn)

    def _add_pairs(self, rows: torch.Tensor, neurons: torch.Tensor, g_at: torch.Tensor, keys: dict, valid: dict):
        """Count (n-gram, neuron) pairs of the fires at (row, neuron) of a batch whose n-gram keys and their
        validity are `keys` and `valid` (order -> per token, BatchContext), and sum g_at (g at each fire) per
        pair for the orders in G_ORDERS. The sums run on the host in the order of the fires (rows ascending
        within a neuron in every formulation), so they agree to the bit."""
        device = keys[1].device
        rows, neurons = rows.to(device), neurons.to(device)
        for n in NGRAM_ORDERS:
            valid_at = valid[n][rows]
            grams = keys[n][rows[valid_at]]
            if not len(grams):
                continue
            gram_ids, gram_of = torch.unique(grams, return_inverse=True)
            pair, inverse, count = torch.unique(gram_of * self.d_ffn + neurons[valid_at], return_inverse=True,
                                                return_counts=True)
            g_sum = None
            if n in G_ORDERS:
                g_sum = np.bincount(inverse.cpu().numpy(),
                                    weights=g_at[valid_at.to(g_at.device)].double().cpu().numpy(), minlength=len(pair))
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
                           self.pos_fire.cpu().numpy(), value, index, g, *start)
        if self.ngram_counted is not None:
            state.ngram_counted = self.ngram_counted.copy()
            state.ngrams = (self._pairs_of_kept() if self._keeps else
                            {n: Sparse.reduce(parts, n in G_ORDERS) for n, parts in self._pairs.items()})
        return state

    def take_samples(self) -> np.ndarray:
        """The sampled rows of g, float32 (cache.state.Samples: any finite g, exactly): samples_out, filled."""
        if self.samples:
            # one move to the host per layer and shard, in g's dtype (half the bytes of a 16-bit model's)
            taken = torch.cat(self.samples).cpu()
            if self._samples_out is None:
                return taken.float().numpy()
            self._samples_out[:] = taken
        if self._samples_out is not None:
            return self._samples_out.numpy()
        return np.zeros((0, self.d_ffn), Samples.DTYPE)


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
