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

_STRIPE = 64  # columns per parallel task: a few cache lines of each row


@njit(parallel=True, cache=True, nogil=True)
def batch_stats(g, act, taus, primary, seq_len, fire_count, g_sum, g_sumsq, g_max, pos_fire,
                seq_max, seq_arg, seq_g, batch_fires):
    """Accumulate one batch into the layer's running statistics (all arrays updated in place).

    g, act: (n, d) float32, n a multiple of seq_len; act is what the firing rule thresholds.
    fire_count (n_taus, d) int64; g_sum, g_sumsq (d,) float64; g_max (d,) float32;
    pos_fire (seq_len, d) int64; seq_max (n // seq_len, d) float32, seq_arg (same) int64 and seq_g
    (same) float32 receive each sequence's largest act over positions >= 1 (the first on ties), its
    position and g there (-inf, 0, NaN when seq_len is 1); batch_fires (d,) int64 receives this
    batch's fires at the primary threshold.
    """
    n, d = g.shape
    n_taus = taus.shape[0]
    tau_p = taus[primary]
    n_stripes = (d + _STRIPE - 1) // _STRIPE
    for stripe in prange(n_stripes):
        lo = stripe * _STRIPE
        hi = min(lo + _STRIPE, d)
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
            for j in range(width):
                a = a_row[j]
                p_row[j] += a > tau_p
                x = x_row[j]
                xd = np.float64(x)
                s[j] += xd
                ss[j] += xd * xd
                mx[j] = max(mx[j], x)
                if pos > 0 and a > smax[j]:
                    smax[j] = a
                    sarg[j] = pos
                    sg[j] = x
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
def gram_pairs(act, g, tau, cols, table_row, sum_of, n_sum_rows, offsets, row_out, neuron_out, count_out, g_out,
               used):
    """Count the (n-gram, neuron) pairs of one batch's fires (act > tau) of the neurons `cols`, every n-gram
    order in one pass over act: each stripe of columns counts into a small dense table (a row per distinct
    n-gram of the batch, of every order, stacked; a column per neuron of the stripe), then writes its nonzero
    cells, table row then neuron ascending.

    table_row (orders, n) int64: each token's n-gram's row in the table, -1 where that n-gram holds the start
    token. sum_of (rows,) int64: a table row's row in the g-sum table (the orders that sum g), else -1: sums
    run in token order, float64, as a bincount over the fires in order gives them. offsets (stripes + 1,):
    where each stripe's entries start in the outputs (its columns' fires times the orders bound them).
    Outputs: each pair's table row, neuron, count and g sum (NaN where not summed); used (stripes,) receives
    each stripe's number of entries."""
    n = act.shape[0]
    n_orders = table_row.shape[0]
    n_rows = sum_of.shape[0]
    n_stripes = (cols.shape[0] + _STRIPE - 1) // _STRIPE
    for stripe in prange(n_stripes):
        lo = stripe * _STRIPE
        width = min(lo + _STRIPE, cols.shape[0]) - lo
        stripe_cols = cols[lo:lo + width]
        counts = np.zeros((n_rows, width), np.int32)
        sums = np.zeros((n_sum_rows, width), np.float64)
        fires = np.empty(width, np.bool_)
        for row in range(n):
            a_row = act[row]
            for j in range(width):
                fires[j] = a_row[stripe_cols[j]] > tau
            for k in range(n_orders):
                r = table_row[k, row]
                if r < 0:
                    continue
                c_row = counts[r]
                s = sum_of[r]
                for j in range(width):
                    c_row[j] += fires[j]
                if s >= 0:
                    s_row = sums[s]
                    g_row = g[row]
                    for j in range(width):
                        if fires[j]:
                            s_row[j] += np.float64(g_row[stripe_cols[j]])
        at = offsets[stripe]
        for r in range(n_rows):
            c_row = counts[r]
            s = sum_of[r]
            for j in range(width):
                if c_row[j]:
                    row_out[at] = r
                    neuron_out[at] = stripe_cols[j]
                    count_out[at] = c_row[j]
                    g_out[at] = sums[s, j] if s >= 0 else np.nan
                    at += 1
        used[stripe] = at - offsets[stripe]


def pair_counts(act: np.ndarray, g: np.ndarray, tau: float, counted: np.ndarray, fires: np.ndarray,
                table: GramTable) -> dict[int, Sparse]:
    """One batch's (n-gram, neuron) pairs of the `counted` neurons' fires (act > tau), per order, g summed for
    G_ORDERS (`table`: the batch's GramTable): each a run per stripe of neurons, sorted by n-gram then neuron.
    `fires` (d,): each neuron's fires in the batch (batch_stats' batch_fires), which bound the outputs."""
    cols = np.flatnonzero(counted).astype(np.int64)
    starts = np.arange(0, len(cols), _STRIPE)
    bound = np.add.reduceat(fires[cols] * len(NGRAM_ORDERS), starts) if len(cols) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(bound)]).astype(np.int64)
    total = int(offsets[-1])
    rows, neurons = np.empty(total, np.int64), np.empty(total, np.int32)
    counts, sums, used = np.empty(total, np.int64), np.empty(total, np.float64), np.empty(len(starts), np.int64)
    gram_pairs(act, g, np.float32(tau), cols, table.table_row, table.sum_of, table.n_sum_rows, offsets, rows,
               neurons, counts, sums, used)
    keep = np.concatenate([np.arange(offsets[s], offsets[s] + used[s]) for s in range(len(starts))]) \
        if len(starts) else np.zeros(0, np.int64)
    rows, neurons, counts, sums = rows[keep], neurons[keep], counts[keep], sums[keep]
    order_of = np.searchsorted(table.bounds, rows, "right") - 1
    out = {}
    for k, n in enumerate(NGRAM_ORDERS):
        at = order_of == k
        out[n] = Sparse(table.grams[rows[at]], neurons[at], counts[at], sums[at] if n in G_ORDERS else None)
    return out
