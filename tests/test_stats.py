"""The fused CPU kernel and the torch formulation give the same statistics."""
import numpy as np
import pytest
import torch

from engine import stats as stats_module
from engine.stats import BatchContext, LayerStats


@pytest.mark.skipif(stats_module.cpu_kernels is None, reason="numba not installed")
@pytest.mark.parametrize("gated", [False, True])
def test_fused_equals_torch(gated):
    torch.manual_seed(0)
    seq_len, d, n_seqs = 16, 80, 6  # d not a multiple of the kernel's stripe
    counted = np.random.default_rng(0).random(d) < 0.7
    taus, primary, k = [0.0, 0.5, 1.0, 2.0], 2, 3
    fused = LayerStats(d, seq_len, taus, primary, k, torch.device("cpu"), counted, fused=True)
    plain = LayerStats(d, seq_len, taus, primary, k, torch.device("cpu"), counted, fused=False)
    for batch in range(3):
        n = n_seqs * seq_len
        g = torch.randn(n, d) * 1.5
        act = torch.nn.functional.silu(torch.randn(n, d) * 2) if gated else g
        tokens = torch.randint(0, 50, (n,))
        ctx = BatchContext(seq_start=torch.arange(n_seqs) * seq_len + batch * n,
                           gram_keys={1: tokens, 2: tokens * 50 + tokens.roll(1), 3: tokens * 7 + 3},
                           gram_valid={m: (torch.arange(n) % seq_len) >= m for m in (1, 2, 3)},
                           sample_rows=torch.tensor([1, 5]), seq_len=seq_len)
        fused.update(g, act, ctx)
        plain.update(g, act, ctx)
    a, b = fused.to_host(), plain.to_host()
    for name in ("fire_count", "pos_fire", "g_max", "topk_value", "topk_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.g_sum, b.g_sum, rtol=1e-9)
    np.testing.assert_allclose(a.g_sumsq, b.g_sumsq, rtol=1e-6)  # torch squares in float32
    assert a.fire_count[primary].sum() > 0
    for n in (1, 2, 3):
        assert len(a.ngrams[n]) > 0
        for column in ("gram", "neuron", "count"):
            np.testing.assert_array_equal(getattr(a.ngrams[n], column), getattr(b.ngrams[n], column))
        assert set(a.ngrams[n].neuron.tolist()) <= set(np.flatnonzero(counted).tolist())
    np.testing.assert_array_equal(fused.take_samples(), plain.take_samples())
