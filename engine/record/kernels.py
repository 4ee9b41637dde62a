"""Fused CPU kernels for the per-batch neuron statistics.

On a CPU every pass over a (tokens x d_ffn) activation block costs about as much as a good part of
the layer that made it, and torch needs a dozen such passes for the statistics (a comparison and a
reduction per threshold, sums, squares, maxima, per-position counts). These numba kernels read the
block once, column stripes in parallel, so recording stays close to the speed of a bare forward
pass. engine.record.stats uses the torch formulation on GPUs, and as the reference in the tests.
"""
from __future__ import annotations

import numpy as np
from numba import config, njit, prange

from ffnscope.cache.state import G_ORDERS, NGRAM_ORDERS, Sparse
from ffnscope.engine.record.grams import GramTable

# OpenMP's pool spins between parallel regions and starves torch's own threads of the cores they
# share (twice slower layers measured); the workqueue pool sleeps instead.
config.THREADING_LAYER = "workqueue"

STRIPE = 64  # columns per parallel task: a few cache lines of each row, and one uint64 of fire bits


@njit(parallel=True, cache=True, nogil=True)
def batch_stats(g, act, taus, primary, seq_len, fire_count, g_sum, g_sumsq, g_max, pos_fire,
                seq_max, seq_arg, seq_g, batch_fires, fire_bits):
    """Accumulate one batch into the layer's running statistics (all arrays updated in place).

    g, act: (n, d) float32, n a multiple of seq_len; act is what the firing rule thresholds.
    fire_count (n_taus, d) int64; g_sum, g_sumsq (d,) float64; g_max (d,) float32;
    pos_fire (seq_len, d) int32; seq_max (n // seq_len, d) float32, seq_arg (same) int64 and seq_g
    (same) float32 receive each sequence's largest act over positions >= 1 (the first on ties), its
    position and g there (-inf, 0, NaN when seq_len is 1); batch_fires (d,) int64 receives this
    batch's fires at the primary threshold, and fire_bits (n, stripes) uint64 where they are: bit j of
    [row, stripe] for column stripe * STRIPE + j (what gram_pairs reads instead of act).
    """
    n, d = g.shape
    n_taus = taus.shape[0]
    tau_p = taus[primary]
    n_stripes = (d + STRIPE - 1) // STRIPE
    for stripe in prange(n_stripes):
        lo = stripe * STRIPE
        hi = min(lo + STRIPE, d)
        width = hi - lo
        counts = np.zeros((n_taus, width), np.int32)
        s = np.zeros(width, np.float64)
        ss = np.zeros(width, np.float64)
        mx = np.full(width, -np.inf, np.float32)
        smax = np.full(width, -np.inf, np.float32)
        sarg = np.zeros(width, np.int64)
        sg = np.full(width, np.nan, np.float32)
        for row in range(n):
            pos = row % seq_len
            if pos == 0:
                smax[:] = -np.inf
                sarg[:] = 0
                sg[:] = np.nan
            x_row = g[row, lo:hi]
            a_row = act[row, lo:hi]
            p_row = pos_fire[pos, lo:hi]
            for t in range(n_taus):
                tau = taus[t]
                for j in range(width):
                    counts[t, j] += a_row[j] > tau
            bits = np.uint64(0)
            for j in range(width):  # branch-free: the compiler vectorizes it
                fired = a_row[j] > tau_p
                p_row[j] += fired
                bits |= np.uint64(fired) << np.uint64(j)
                xd = np.float64(x_row[j])
                s[j] += xd
                ss[j] += xd * xd
                mx[j] = max(mx[j], x_row[j])
            fire_bits[row, stripe] = bits
            if pos > 0:
                for j in range(width):
                    better = a_row[j] > smax[j]
                    smax[j] = a_row[j] if better else smax[j]
                    sarg[j] = pos if better else sarg[j]
                    sg[j] = x_row[j] if better else sg[j]
            if pos == seq_len - 1:
                seq = row // seq_len
                seq_max[seq, lo:hi] = smax
                seq_arg[seq, lo:hi] = sarg
                seq_g[seq, lo:hi] = sg
        for j in range(width):
            col = lo + j
            for t in range(n_taus):
                fire_count[t, col] += counts[t, j]
            batch_fires[col] = counts[primary, j]
            g_sum[col] += s[j]
            g_sumsq[col] += ss[j]
            if mx[j] > g_max[col]:
                g_max[col] = mx[j]


@njit(parallel=True, cache=True, nogil=True)
def gram_pairs(fire_bits, counted_bits, g, table_row, sum_of, n_sum_rows, offsets, row_out, neuron_out, count_out,
               g_out, used):
    """Count the (n-gram, neuron) pairs of one batch's fires at the counted neurons, every n-gram order at once:
    each stripe of neurons counts into a dense table (a row per distinct n-gram of the batch, of every order,
    stacked; a column per neuron of the stripe) of which only the rows its fires touch are zeroed and read
    (fires are sparse), then writes their nonzero cells, table row then neuron ascending.

    fire_bits (n, stripes) uint64: the fires, as batch_stats gives them; counted_bits (stripes,) uint64: the
    counted neurons, bit j of a stripe for its column j. table_row (orders, n) int64: each token's n-gram's row
    in the table, -1 where that n-gram holds the start token. sum_of (rows,) int64: a table row's row in the
    g-sum table (the orders that sum g), else -1: sums run in token order, float64, as a bincount over the
    fires in order gives them. offsets (stripes + 1,): where each stripe's entries start in the outputs (its
    counted fires times the orders bound them). Outputs: each pair's table row, neuron, count and g sum (NaN
    where not summed); used (stripes,) receives each stripe's number of entries."""
    n, n_stripes = fire_bits.shape
    n_orders = table_row.shape[0]
    n_rows = sum_of.shape[0]
    d = g.shape[1]
    for stripe in prange(n_stripes):
        lo = stripe * STRIPE
        width = min(lo + STRIPE, d) - lo
        wanted = counted_bits[stripe]
        counts = np.empty((n_rows, width), np.int32)  # a row zeroed when first touched
        sums = np.empty((n_sum_rows, width), np.float64)
        seen = np.zeros(n_rows, np.bool_)
        touched = np.empty(n_rows, np.int64)
        n_touched = 0
        for row in range(n):
            bits = fire_bits[row, stripe] & wanted
            if bits == 0:
                continue
            for k in range(n_orders):
                r = table_row[k, row]
                if r < 0:
                    continue
                s = sum_of[r]
                if not seen[r]:
                    seen[r] = True
                    touched[n_touched] = r
                    n_touched += 1
                    counts[r, :] = 0
                    if s >= 0:
                        sums[s, :] = 0.0
                for j in range(width):
                    if (bits >> np.uint64(j)) & np.uint64(1):
                        counts[r, j] += 1
                        if s >= 0:
                            sums[s, j] += np.float64(g[row, lo + j])
        at = offsets[stripe]
        for r in np.sort(touched[:n_touched]):
            s = sum_of[r]
            for j in range(width):
                if counts[r, j]:
                    row_out[at] = r
                    neuron_out[at] = lo + j
                    count_out[at] = counts[r, j]
                    g_out[at] = sums[s, j] if s >= 0 else np.nan
                    at += 1
        used[stripe] = at - offsets[stripe]

def stripe_bits(mask: np.ndarray) -> np.ndarray:
    """A (d,) bool mask as batch_stats' fire_bits hold columns: (stripes,) uint64, bit j for column j of a stripe."""
    padded = np.zeros(-(-len(mask) // STRIPE) * STRIPE, bool)
    padded[:len(mask)] = mask
    weights = np.uint64(1) << np.arange(STRIPE, dtype=np.uint64)
    return (padded.reshape(-1, STRIPE).astype(np.uint64) * weights).sum(1, dtype=np.uint64)


def pair_counts(fire_bits: np.ndarray, g: np.ndarray, counted: np.ndarray, fires: np.ndarray,
                table: GramTable) -> dict[int, Sparse]:
    """One batch's (n-gram, neuron) pairs of the `counted` neurons' fires (fire_bits, from batch_stats), per
    order, g summed for G_ORDERS (`table`: the batch's GramTable): each a run per stripe of neurons, sorted by
    n-gram then neuron. `fires` (d,): each neuron's fires in the batch (batch_stats' batch_fires), which bound
    the outputs."""
    n_stripes = fire_bits.shape[1]
    bound = np.add.reduceat(np.where(counted, fires, 0) * len(NGRAM_ORDERS), np.arange(0, len(counted), STRIPE))
    offsets = np.concatenate([[0], np.cumsum(bound)]).astype(np.int64)
    total = int(offsets[-1])
    rows, neurons = np.empty(total, np.int64), np.empty(total, np.int32)
    counts, sums, used = np.empty(total, np.int64), np.empty(total, np.float64), np.empty(n_stripes, np.int64)
    gram_pairs(fire_bits, stripe_bits(counted), g, table.table_row, table.sum_of, table.n_sum_rows, offsets, rows,
               neurons, counts, sums, used)
    keep = np.concatenate([np.arange(offsets[s], offsets[s] + used[s]) for s in range(n_stripes)])
    rows, neurons, counts, sums = rows[keep], neurons[keep], counts[keep], sums[keep]
    order_of = np.searchsorted(table.bounds, rows, "right") - 1
    out = {}
    for k, n in enumerate(NGRAM_ORDERS):
        at = order_of == k
        out[n] = Sparse(table.grams[rows[at]], neurons[at], counts[at], sums[at] if n in G_ORDERS else None)
    return out
