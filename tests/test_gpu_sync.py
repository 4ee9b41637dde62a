"""On a GPU, recording makes no host synchronization per batch: LayerStats keeps each batch's n-gram fires on the
device (engine.record.stats) and brings them to the host once per layer and shard. Counted on the CPU under
tests/fake_cuda.py (FakeRuntime.syncs); then, with real values on the CPU, what a batch past the kept capacity
does, and that the kept pairs equal the exact ones to the bit."""
import os
import warnings

import numpy as np
import pytest
import torch

import ffnscope.engine.record.job as record_job
from ffnscope.engine.model.load import load_model
from ffnscope.engine.record import stats as stats_module
from ffnscope.engine.record.stats import BatchContext, LayerStats
from tests.arch_sweep import build
from tests.fake_cuda import Unavailable, fake_cuda, register_cuda_guard
from tests.helpers import record_tiny
from tests.test_fake_cuda import _one_resident
from tests.tiny_models import save

SEQ_LEN, D_FFN = 8, 40


@pytest.fixture(scope="module")
def fake():
    try:
        register_cuda_guard()
    except Unavailable as why:
        if os.environ.get("CI"):  # CI has a compiler: there the GPU path must run
            pytest.fail(str(why))
        pytest.skip(str(why))


def _batches(n_batches: int, n_seqs: int = 3, dtype=torch.float32, device="cpu", seed=0):
    """(g, act, context) of gated-FFN-like batches on `device`, many acts above 0.5 (the primary threshold)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    n = n_seqs * SEQ_LEN
    for b in range(n_batches):
        act = torch.nn.functional.silu(torch.randn(n, D_FFN, generator=gen) * 2)
        g = act * torch.randn(n, D_FFN, generator=gen)
        tokens = torch.randint(0, 12, (n,), generator=gen)
        keys = {1: tokens, 2: tokens * 12 + tokens.roll(1), 3: tokens * 7 + 3}
        ctx = BatchContext(seq_start=(torch.arange(n_seqs) * SEQ_LEN + b * n).to(device),
                           gram_keys={m: k.to(device) for m, k in keys.items()},
                           gram_valid={m: ((torch.arange(n) % SEQ_LEN) >= m).to(device) for m in keys},
                           sample_rows=torch.tensor([2], device=device), seq_len=SEQ_LEN)
        out.append((g.to(dtype).to(device), act.to(dtype).to(device), ctx))
    return out


COUNTED = np.arange(D_FFN) % 5 != 0


def _stats(device="cpu", **options) -> LayerStats:
    return LayerStats(D_FFN, SEQ_LEN, [0.0, 0.5], 1, 3, torch.device(device), COUNTED, fused=False, **options)


# --- on fake cuda tensors: the synchronizations counted ------------------------------------------------------
@pytest.mark.parametrize("gated", [True, False])
def test_layer_stats_update_makes_no_host_sync(gated, fake):
    """update alone: none; to_host: as many for two batches as for four."""
    at_layer_end = []
    for n_batches in (2, 4):
        with fake_cuda() as runtime:
            stats, batches = _stats("cuda"), _batches(n_batches, device="cuda")
            runtime.syncs.clear()  # making them copied to the device
            for g, act, ctx in batches:
                stats.update(g, act if gated else g, ctx)
            assert runtime.syncs == {}, f"update synchronized the host: {runtime.syncs}"
            stats.to_host()
            stats.take_samples()
        at_layer_end.append(runtime.syncs)
    assert at_layer_end[0] == at_layer_end[1]


_SYNCS: dict[str, list[dict]] = {}


def _recording_syncs(hidden: str, text_file, tmp_path_factory) -> list[dict]:
    """The host synchronizations of a whole recording on cuda with two batches a layer, and with four (one
    shard; one layer resident, the other streamed; the hidden states where `hidden` says), once a module."""
    if hidden not in _SYNCS:
        base = tmp_path_factory.mktemp(f"gpu-sync-{hidden}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            directory = save(build("llama"), base / "llama")
        lm = load_model(str(directory))
        _SYNCS[hidden] = []
        with pytest.MonkeyPatch.context() as monkeypatch:
            _one_resident(monkeypatch, hidden)
            monkeypatch.setattr(record_job, "load_model", lambda *_a, **_k: lm)
            for tokens in (64, 64, 128):  # batches of 32 tokens; the first places the model: left out
                with fake_cuda() as runtime:
                    state = record_tiny(base / f"{tokens}.h5", directory, [text_file], tokens=tokens, device="cuda",
                                        seq_len=16, shard_tokens=tokens, batch_tokens=32, calib_tokens=64, samples=8,
                                        ngram_max_freq=1.0, force=True)  # no early skips: no calibration block
                assert state.meta["recording"]["ngram_layers"]  # the n-gram pairs were recorded
                _SYNCS[hidden].append(runtime.syncs)
        del _SYNCS[hidden][0]
    return _SYNCS[hidden]


def _without_uploads(syncs: dict) -> dict:
    return {name: n for name, n in syncs.items() if name != "to_device"}


@pytest.mark.parametrize("hidden", ["device", "pinned"])
def test_recording_syncs_do_not_grow_with_batches(hidden, fake, text_file, tmp_path_factory):
    """A whole recording reads values on the host as often with four batches a layer as with two."""
    two, four = map(_without_uploads, _recording_syncs(hidden, text_file, tmp_path_factory))
    assert two == four


def test_recording_uploads_do_not_grow_with_batches(fake, text_file, tmp_path_factory):
    two, four = _recording_syncs("device", text_file, tmp_path_factory)
    assert two["to_device"] == four["to_device"]


# --- with real values, on the CPU ------------------------------------------------------------------------------
def _record(stats: LayerStats, batches) -> LayerStats:
    for g, act, ctx in batches:
        stats.update(g, act, ctx)
    return stats


def _assert_same_pairs(a, b):
    for n, pairs in a.ngrams.items():
        for column in ("gram", "neuron", "count", "g_sum"):
            np.testing.assert_array_equal(getattr(pairs, column), getattr(b.ngrams[n], column),
                                          err_msg=f"{n} {column}")


@pytest.mark.parametrize("chunk", [stats_module.PAIR_CHUNK, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_pairs_equal_exact_ones_and_an_overflow_is_flagged(dtype, chunk, monkeypatch):
    """Kept on the device at a capacity the busiest batch fills exactly, the pairs equal those made batch by
    batch (exact_pairs) to the bit, made into pairs in one chunk or batch by batch; one fire less and that batch
    overflows: pairs_overflowed, pairs short, and most_fires the capacity that fits."""
    monkeypatch.setattr(stats_module, "PAIR_CHUNK", chunk)
    batches = _batches(4, dtype=dtype)
    most = max(int((act[:, COUNTED] > 0.5).sum()) for _, act, _ in batches)
    exact = _record(_stats(exact_pairs=True), batches)
    full = _record(_stats(pair_capacity=most), batches)
    default = _record(_stats(), batches)
    short = _record(_stats(pair_capacity=most - 1), batches)
    want = exact.to_host()
    assert sum(len(p) for p in want.ngrams.values()) > 0 and want.ngrams[1].g_sum is not None
    for stats in (full, default):
        got = stats.to_host()
        assert not stats.pairs_overflowed
        _assert_same_pairs(got, want)
    lost = short.to_host()
    assert short.pairs_overflowed and not exact.pairs_overflowed
    assert short.most_fires == full.most_fires == most
    assert lost.ngrams[1].count.sum() < want.ngrams[1].count.sum()
    np.testing.assert_array_equal(lost.fire_count, want.fire_count)  # only the pairs are short
