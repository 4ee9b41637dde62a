"""The fused CPU kernel and the torch formulation give the same statistics."""
import numpy as np
import pytest
import torch

from ffnscope.engine.record import stats as stats_module
from ffnscope.engine.record.stats import BatchContext, LayerStats


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
    for name in ("fire_count", "pos_fire", "g_max", "topk_value", "topk_index", "topk_g", "start_value",
                 "start_index", "start_g"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.topk_index % seq_len != 0).all()  # position 0 only ever in the start slot
    assert (a.start_index % seq_len == 0).all()
    np.testing.assert_allclose(a.g_sum, b.g_sum, rtol=1e-9)
    np.testing.assert_allclose(a.g_sumsq, b.g_sumsq, rtol=1e-6)  # torch squares in float32
    assert a.fire_count[primary].sum() > 0
    for n in (1, 2, 3):
        assert len(a.ngrams[n]) > 0
        for column in ("gram", "neuron", "count", "g_sum"):
            np.testing.assert_array_equal(getattr(a.ngrams[n], column), getattr(b.ngrams[n], column))
        assert (a.ngrams[n].g_sum is not None) == (n == 1)
        assert set(a.ngrams[n].neuron.tolist()) <= set(np.flatnonzero(counted).tolist())
    np.testing.assert_array_equal(fused.take_samples(), plain.take_samples())


def _batches(seq_len, d, n_seqs, n_batches, relu, seed=0):
    """Activation batches with many ties (ReLU zeros, values on a coarse grid) and their contexts."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in range(n_batches):
        n = n_seqs * seq_len
        act = torch.round(torch.randn(n, d, generator=gen) * 2) / 2
        act = act.clamp(min=0) if relu else torch.nn.functional.silu(act)
        up = torch.randn(n, d, generator=gen)
        g = act if relu else act * up
        tokens = torch.randint(0, 20, (n,), generator=gen)
        ctx = BatchContext(seq_start=torch.arange(n_seqs) * seq_len + batch * n,
                           gram_keys={1: tokens, 2: tokens * 20 + tokens.roll(1), 3: tokens * 7 + 3},
                           gram_valid={m: (torch.arange(n) % seq_len) >= m for m in (1, 2, 3)},
                           sample_rows=torch.zeros(0, dtype=torch.int64), seq_len=seq_len)
        out.append((g, act, ctx))
    return out


def _expected_contexts(batches, seq_len, k):
    """Top-k and start slot by their definition, in plain numpy: per sequence the first largest act
    at positions >= 1; the k largest over sequences, ties to the smaller token index; position 0 apart."""
    act = np.concatenate([a.numpy() for _, a, _ in batches]).reshape(-1, seq_len, batches[0][1].shape[1])
    g = np.concatenate([x.numpy() for x, _, _ in batches]).reshape(act.shape)
    n, _, d = act.shape
    pos = act[:, 1:].argmax(1) + 1
    value = np.take_along_axis(act, pos[:, None], 1)[:, 0]
    index = np.arange(n)[:, None] * seq_len + pos
    at = np.take_along_axis(g, pos[:, None], 1)[:, 0]
    want = {name: np.zeros((k, d), dtype) for name, dtype in
            (("topk_value", np.float32), ("topk_index", np.int64), ("topk_g", np.float32))}
    for j in range(d):
        best = sorted(range(n), key=lambda s: (-value[s, j], index[s, j]))[:k]
        want["topk_value"][:, j], want["topk_index"][:, j], want["topk_g"][:, j] = \
            value[best, j], index[best, j], at[best, j]
    first = act[:, 0].argmax(0)  # the first (smallest index) of the largest
    want.update(start_value=act[first, 0, np.arange(d)], start_index=first * seq_len,
                start_g=g[first, 0, np.arange(d)])
    return want


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("fused", [False, True] if stats_module.cpu_kernels is not None else [False])
def test_contexts_rank_by_act_with_ties_broken_by_index(relu, fused):
    """Contexts are the top-k by act (ties: smaller token index) over positions >= 1, g there,
    and one start-token slot, exactly as defined, with ties everywhere (ReLU zeros, a value grid)."""
    seq_len, d, k = 8, 70, 5
    batches = _batches(seq_len, d, 4, 3, relu)
    stats = LayerStats(d, seq_len, [0.0, 0.5], 1, k, torch.device("cpu"), None, fused=fused)
    for g, act, ctx in batches:
        stats.update(g, act, ctx)
    got = stats.to_host()
    for name, want in _expected_contexts(batches, seq_len, k).items():
        np.testing.assert_array_equal(getattr(got, name), want, err_msg=name)


def test_split_recordings_add_up_to_one():
    """What a layer holds is additive: two LayerStats over halves of the batches, added as resume and
    merge add them (LayerState.add), equal one LayerStats over all of them."""
    seq_len, d, k = 8, 70, 4
    counted = np.ones(d, bool)
    batches = _batches(seq_len, d, 3, 4, relu=False, seed=1)
    taus, primary = [0.0, 0.5], 1

    def run(part):
        stats = LayerStats(d, seq_len, taus, primary, k, torch.device("cpu"), counted, fused=False)
        for g, act, ctx in part:
            stats.update(g, act, ctx)
        return stats.to_host()

    whole, first, second = run(batches), run(batches[:2]), run(batches[2:])
    first.add(second)
    for name in ("fire_count", "pos_fire", "g_max", "topk_value", "topk_index", "topk_g", "start_value",
                 "start_index", "start_g"):
        np.testing.assert_array_equal(getattr(first, name), getattr(whole, name), err_msg=name)
    for n in (1, 2, 3):
        for column in ("gram", "neuron", "count"):
            np.testing.assert_array_equal(getattr(first.ngrams[n], column), getattr(whole.ngrams[n], column))
    np.testing.assert_allclose(first.ngrams[1].g_sum, whole.ngrams[1].g_sum, rtol=1e-12)
    # and the token g sums are the sums of g over the fires on each token
    g = np.concatenate([b[0].numpy() for b in batches]).astype(np.float64)
    fires = np.concatenate([b[1].numpy() for b in batches]) > taus[primary]
    tokens = np.concatenate([b[2].gram_keys[1].numpy() for b in batches])
    valid = np.concatenate([b[2].gram_valid[1].numpy() for b in batches])
    dense = np.zeros((20, d))
    np.add.at(dense, tokens[valid], np.where(fires, g, 0.0)[valid])
    got = np.zeros((20, d))
    np.add.at(got, (whole.ngrams[1].gram, whole.ngrams[1].neuron), whole.ngrams[1].g_sum)
    np.testing.assert_allclose(got, dense, rtol=1e-12, atol=1e-12)
