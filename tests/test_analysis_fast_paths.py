"""The analyses' fast paths give the same numbers, bit for bit, as the direct computations they replace:
the positional plug-in MI from integer fire counts (engine.analysis.positional.count_mutual_information),
coverage numbers from a narrow-key sort (engine.analysis.ngrams.coverage_numbers), n-gram occurrences
searched once per run of pairs (gram_occurrences), suppression's projection with
the unembedding cast once, and `analyze` given the recorded model (as `record --analyze` holds it)
instead of loading it again."""
from __future__ import annotations

import random
import shutil

import h5py
import numpy as np
import pytest

from ffnscope.cache.state import GramCounts, Sparse
from ffnscope.engine.analysis.job import analyze
from ffnscope.engine.analysis.ngrams import coverage_numbers, gram_occurrences
from ffnscope.engine.analysis.positional import count_mutual_information, mutual_information
from ffnscope.engine.analysis.suppression import suppression_layer
from tests.helpers import record_tiny
from tests.tiny_models import planted_opt, save


@pytest.mark.parametrize("seq_len,n_seqs,dtype", [(256, 12, np.int32), (256, 40, np.uint16), (64, 12, np.uint8),
                                                  (64, 300, np.int64), (256, 12, np.int64)])
@pytest.mark.parametrize("width", [1, 2, 37])
def test_count_mutual_information_is_the_direct_one(seq_len, n_seqs, dtype, width):
    """Looked up per fire count (fewer counts than positions) or computed directly: the same bits as
    mutual_information on the frequencies, dead and always-on neurons included."""
    rng = np.random.default_rng(seq_len + n_seqs + width)
    counts = rng.binomial(n_seqs, rng.uniform(0, 1, width), (seq_len, width)).astype(dtype)
    counts[:, 0] = 0
    if width > 1:
        counts[:, 1] = n_seqs
    freq = counts.sum(axis=0, dtype=np.int64) / (n_seqs * seq_len)
    expected = mutual_information(counts / n_seqs, freq)
    assert count_mutual_information(counts, n_seqs, freq).tobytes() == expected.tobytes()


def _coverage_by_lexsort(sparse: Sparse, d_ffn: int, share: float):
    """coverage_numbers as it was first written: a lexsort of (neuron, count descending)."""
    fires = np.bincount(sparse.neuron, weights=sparse.count, minlength=d_ffn).astype(np.int64)
    order = np.lexsort((-sparse.count, sparse.neuron))
    neuron, count = sparse.neuron[order], sparse.count[order]
    starts = np.searchsorted(neuron, np.arange(d_ffn))
    cum = np.concatenate([[0], np.cumsum(count)])
    within = cum[1:] - cum[starts][neuron]
    coverage = np.bincount(neuron[within < share * fires[neuron]], minlength=d_ffn) + 1
    coverage[fires == 0] = 0
    return fires, coverage.astype(np.int64)


@pytest.mark.parametrize("pairs", [0, 1, 5000])
@pytest.mark.parametrize("most", [5, 10**6, 2**40])  # counts sorted as 16-bit, 32-bit and int64 keys
def test_coverage_numbers_match_the_lexsort(pairs, most):
    """Ties in count, neurons that never fire, one pair, none: the same fires and coverage numbers."""
    rng = np.random.default_rng(pairs)
    d_ffn = 64
    keys = np.unique(rng.integers(0, 500 * d_ffn, pairs))  # sorted by gram, then neuron, as recorded
    counts = rng.integers(1, 6, len(keys)) * (most // 5)
    sparse = Sparse(keys // d_ffn, (keys % d_ffn).astype(np.int32), counts.astype(np.int64))
    for share in (0.5, 0.95, 1.0):
        got, expected = coverage_numbers(sparse, d_ffn, share), _coverage_by_lexsort(sparse, d_ffn, share)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("order", ["sorted", "shuffled", "empty"])
def test_gram_occurrences_are_the_searched_ones(order):
    """Searched once per run of equal keys: the same counts as one search per key, in any key order."""
    rng = np.random.default_rng(4)
    grams = GramCounts(np.unique(rng.integers(0, 10**9, 300)), rng.integers(1, 10**6, 300))
    keys = np.sort(rng.choice(grams.gram, 4000)) if order != "empty" else np.zeros(0, np.int64)
    if order == "shuffled":
        rng.shuffle(keys)
    expected = grams.count[np.searchsorted(grams.gram, keys)] if len(keys) else np.zeros(0, np.int64)
    got = gram_occurrences(grams, keys)
    assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()


def test_suppression_float32_unembedding_is_cast_once_to_the_same_numbers():
    """A float32 unembedding (cast once inside) and the same one given as float64 give the same bits."""
    rng = np.random.default_rng(3)
    head = rng.normal(size=(3000, 48)).astype(np.float32)
    rows = rng.normal(size=(7, 48)).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, 48).astype(np.float32)
    triggers = [rng.choice(3000, 3, replace=False) for _ in range(7)]
    g = rng.normal(size=7)
    a = suppression_layer(np.arange(7), triggers, rows, g, norm, head, chunk=3)
    b = suppression_layer(np.arange(7), triggers, rows, g, norm, head.astype(np.float64), chunk=3)
    for key in vars(a):
        assert getattr(a, key).tobytes() == getattr(b, key).tobytes(), key


WORDS = "The cat sat on a mat . Tom ate a big bun and then the tall dog bit the ball . Aha , oh !".split()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast_paths")
    rng = random.Random(1)
    story = tmp / "story.txt"
    story.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    model_dir = save(planted_opt(), tmp / "model")
    cache = tmp / "c.h5"
    record_tiny(cache, model_dir, [story], tokens=4096, seq_len=64, batch_tokens=128, shard_tokens=1024,
                ngram_max_freq=1.0)
    reference = tmp / "reference.h5"
    shutil.copy(cache, reference)
    analyze(reference, log=lambda _m: None)
    return cache, model_dir, _analyses(reference)


def _analyses(path) -> dict[str, bytes]:
    out = {}
    with h5py.File(path) as f:
        f["analysis"].visititems(lambda k, o: out.__setitem__(k, (o.dtype, o.shape, o[()].tobytes()))
                                 if isinstance(o, h5py.Dataset) else None)
    return out


def test_analyze_uses_the_model_it_is_given(recorded, tmp_path, monkeypatch):
    """Given the recorded model in float32, suppression loads nothing and every analysis is the same."""
    from ffnscope.engine.model import load

    cache, model_dir, reference = recorded
    lm = load.load_model(str(model_dir), "float32")

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(load, "load_model", refuse)
    copy = tmp_path / "c.h5"
    shutil.copy(cache, copy)
    assert set(analyze(copy, log=lambda _m: None, model=lm).values()) == {"computed"}
    assert _analyses(copy) == reference
    with h5py.File(copy) as f:
        assert len(f["analysis/suppression/neuron"]) > 0  # the planted detectors were projected


def test_a_model_in_another_dtype_is_loaded_again(recorded, tmp_path, monkeypatch):
    """A recording in bfloat16 holds its model in bfloat16: suppression loads it in float32 as it would
    without one, so the numbers do not depend on the recording's --dtype."""
    from ffnscope.engine.model import load

    cache, model_dir, reference = recorded
    lm = load.load_model(str(model_dir), "bfloat16")
    loads = []
    real = load.load_model

    def counted(*args, **kwargs):
        loads.append(args[1] if len(args) > 1 else kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "load_model", counted)
    copy = tmp_path / "c.h5"
    shutil.copy(cache, copy)
    analyze(copy, log=lambda _m: None, model=lm)
    assert loads == ["float32"]
    assert _analyses(copy) == reference
