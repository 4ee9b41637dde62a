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
def firing_pairs(act, g, tau, counted, offsets, rows_out, cols_out, g_out):
    """(row, neuron) of every fire of the counted neurons and g there, grouped by neuron, rows
    ascending: offsets[c] is where neuron c's fires go (an exclusive prefix sum of the counted
    neurons' fires in this batch)."""
    n, d = act.shape
    n_stripes = (d + _STRIPE - 1) // _STRIPE
    for stripe in prange(n_stripes):
        lo = stripe * _STRIPE
        hi = min(lo + _STRIPE, d)
        cursor = offsets[lo:hi].copy()
        for row in range(n):
            for j in range(hi - lo):
                col = lo + j
                if counted[col] and act[row, col] > tau:
                    rows_out[cursor[j]] = row
                    cols_out[cursor[j]] = col
                    g_out[cursor[j]] = g[row, col]
                    cursor[j] += 1
