"""N-gram counts are kept for every neuron that can be a detector: the limit is a bound derived from the
data (a detector's fires cannot exceed what its <= 5 tokens / <= 50 n-grams occur), stored in the cache,
and a neuron loses its counts only on evidence valid for the whole recording.

Planted OPT (tests.tiny_models) on text where 'a' makes up 12 % of the tokens: its token detector
('a', 'b', 13 % of the tokens) fires far more often than the old fixed 5 % limit allowed, and must be
found; the many-token neuron (letters a-m, ~29 %) fires more often than any detector can and must
still be skipped."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from ffnscope.cache.reader import CacheReader
from ffnscope.cache.store import read_state
from ffnscope.engine.explore.tables import neuron_table
from ffnscope.engine.analysis.job import analyze
from tests.helpers import record_tiny
from tests.tiny_models import DETECTED, DETECTOR, MANY, planted_opt, save

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@pytest.fixture(scope="module")
def frequent_a(tmp_path_factory):
    """Characters drawn independently: 'a' with probability 0.12, the other 61 uniformly."""
    rng = random.Random(3)
    rest = ALPHABET[1:]
    text = "".join("a" if rng.random() < 0.12 else rng.choice(rest) for _ in range(12000))
    path = tmp_path_factory.mktemp("freq") / "frequent_a.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save(planted_opt(), tmp_path_factory.mktemp("bound") / "model")


def _record(tmp_path, model_dir, data, **options):
    cache = tmp_path / "c.h5"
    record_tiny(cache, model_dir, [data], tokens=4096, **options)
    analyze(cache, log=lambda _m: None)
    return cache


@pytest.fixture(scope="module")
def auto_cache(tmp_path_factory, model_dir, frequent_a):
    """Recorded with the defaults: --ngram-max-freq auto."""
    return _record(tmp_path_factory.mktemp("auto"), model_dir, frequent_a)


def _hand_bound(state) -> int:
    """max over n of ceil(top-k occurrences / 0.95) + the positions whose n-gram holds the start token."""
    n_seqs, seq_len = state.data.tokens.shape
    counts = {1: state.data.unigram, 2: state.data.grams[2].count, 3: state.data.grams[3].count}
    top = {n: int(np.sort(c)[::-1][:k].sum()) for n, c, k in ((n, counts[n], k) for n, k in ((1, 5), (2, 50), (3, 50)))}
    return max(math.ceil(top[n] / 0.95) + n_seqs * n for n in (1, 2, 3))


def test_bound_is_derived_from_the_data_and_stored(auto_cache):
    state = read_state(auto_cache, "testing")
    rec = state.meta["recording"]
    assert rec["ngram_max_freq"] == "auto"
    bound = rec["ngram_bound"]
    assert bound["fires"] == _hand_bound(state)
    assert bound["tokens"] == state.n_tokens and bound["coverage"] == 0.95 and bound["max_coverage"] == [5, 50, 50]
    assert 0.05 < bound["freq"] < 0.5   # the data decides: 'a' alone is 12 % of it


def test_frequent_token_detector_is_counted_and_found(auto_cache):
    state = read_state(auto_cache, "testing")
    layer = state.layers[0]
    primary = state.meta["recording"]["primary_index"]
    freq = layer.fire_count[primary, DETECTOR] / state.n_tokens
    assert freq > 0.05                                    # the old fixed limit would have skipped it
    assert layer.ngram_counted[DETECTOR]
    with CacheReader(auto_cache) as reader:
        row = {r["neuron"]: r for r in neuron_table(reader, [0]).rows()}[DETECTOR]
    assert row["token_detector"] is True and row["ngram_counted"] is True
    assert sorted(row["trigger_tokens"]) == sorted(chr(t) for t in DETECTED)


def test_neuron_firing_beyond_any_detector_is_skipped(auto_cache):
    """The bound does work: MANY (letters a-m) fires more often than any 5 tokens or 50 n-grams of this
    data occur; its counts are dropped (after the shards that proved it), and it gets no verdict."""
    from ffnscope.engine.analysis.ngrams import skip_status

    state = read_state(auto_cache, "testing")
    layer = state.layers[0]
    rec = state.meta["recording"]
    fires = layer.fire_count[rec["primary_index"]]
    bound = rec["ngram_bound"]["fires"]
    assert fires[MANY] > bound and not layer.ngram_counted[MANY]
    assert not np.isin(layer.ngrams[1].neuron, [MANY]).any()
    # counted exactly where a neuron can still be a detector: nothing skipped without proof
    np.testing.assert_array_equal(layer.ngram_counted, fires <= bound)
    status = skip_status(layer.ngram_counted, fires, rec["ngram_bound"])
    assert status["unproven"] == 0 and status["proven"] >= 1
    with CacheReader(auto_cache) as reader:
        row = {r["neuron"]: r for r in neuron_table(reader, [0]).rows()}[MANY]
    assert row["token_detector"] is None and row["unigram_coverage"] is None


def test_counts_of_kept_neurons_are_complete(auto_cache):
    """A neuron counted to the end has every fire in its unigram counts (none lost to a shard)."""
    state = read_state(auto_cache, "testing")
    layer = state.layers[0]
    primary = state.meta["recording"]["primary_index"]
    per_neuron = np.bincount(layer.ngrams[1].neuron, weights=layer.ngrams[1].count, minlength=len(layer.ngram_counted))
    fires_after_start = layer.fire_count[primary] - layer.pos_fire[0]
    np.testing.assert_array_equal(per_neuron[layer.ngram_counted], fires_after_start[layer.ngram_counted])


def test_user_cap_skips_without_proof_and_says_so(tmp_path, model_dir, frequent_a):
    """--ngram-max-freq 0.05 (a memory lever) leaves the detector out on the calibration sample: it is
    within the bound, so it gets no verdict (never "not a detector") and the cache says it is unproven."""
    from rich.console import Console

    from ffnscope.app.info_view import provenance
    from ffnscope.engine.analysis.ngrams import skip_status

    cache = _record(tmp_path, model_dir, frequent_a, ngram_max_freq=0.05)
    state = read_state(cache, "testing")
    rec = state.meta["recording"]
    layer = state.layers[0]
    assert rec["ngram_max_freq"] == 0.05 and not layer.ngram_counted[DETECTOR]
    status = skip_status(layer.ngram_counted, layer.fire_count[rec["primary_index"]], rec["ngram_bound"])
    assert status["unproven"] >= 1
    unproven = sum(skip_status(state.layers[i].ngram_counted, state.layers[i].fire_count[rec["primary_index"]],
                               rec["ngram_bound"])["unproven"] for i in rec["ngram_layers"])
    with CacheReader(cache) as reader:
        row = {r["neuron"]: r for r in neuron_table(reader, [0]).rows()}[DETECTOR]
        console = Console(width=300, record=True)
        console.print(provenance(reader))
    assert row["token_detector"] is None and row["ngram_counted"] is False
    text = console.export_text()
    assert f"{unproven} without proof" in text and f"<= {rec['ngram_bound']['fires']:,} times" in text


def test_merged_parts_keep_the_bound(tmp_path, model_dir, frequent_a):
    """Every part derives the bound from the whole packed data: the same bound, so part caches merge."""
    from ffnscope.cache.merge import merge

    record_tiny(tmp_path / "p1.h5", model_dir, [frequent_a], tokens=4096, part=(1, 2))
    record_tiny(tmp_path / "p2.h5", model_dir, [frequent_a], tokens=4096, part=(2, 2))
    a, b = (read_state(tmp_path / p, "testing") for p in ("p1.h5", "p2.h5"))
    assert a.meta["recording"]["ngram_bound"] == b.meta["recording"]["ngram_bound"]
    merged = merge([tmp_path / "p1.h5", tmp_path / "p2.h5"], tmp_path / "m.h5")
    assert merged.layers[0].ngram_counted[DETECTOR]


def test_cap_of_one_counts_every_neuron(tmp_path, model_dir, frequent_a):
    """--ngram-max-freq 1 replaces the bound: every neuron keeps its counts, and MANY gets a verdict (no)."""
    cache = _record(tmp_path, model_dir, frequent_a, ngram_max_freq=1.0)
    state = read_state(cache, "testing")
    assert state.layers[0].ngram_counted.all()
    with CacheReader(cache) as reader:
        rows = {r["neuron"]: r for r in neuron_table(reader, [0]).rows()}
    assert rows[MANY]["token_detector"] is False and rows[DETECTOR]["token_detector"] is True


def test_cli_options():
    from ffnscope.app.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["record", "--out", "x.h5"]).ngram_max_freq is None                 # auto
    assert parse(["record", "--out", "x.h5", "--ngram-max-freq", "auto"]).ngram_max_freq is None
    assert parse(["record", "--out", "x.h5", "--ngram-max-freq", "0.1"]).ngram_max_freq == 0.1
    assert parse(["record", "--out", "x.h5", "--tau-rule", "quantile:0.99"]).tau_rule == "quantile:0.99"
