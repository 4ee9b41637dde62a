"""The paper's analyses find exactly the neurons planted in a tiny OPT."""
import math
import random
import warnings

import numpy as np
import pytest

from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore.tables import layer_table, neuron_table
from ffnscope.engine.analysis.job import analyze
from tests.helpers import record_tiny
from tests.tiny_models import (BIGRAM, BOS_AND_A, DEAD, DETECTED, DETECTOR, MANY, ONE_SIDED, OSCILLATING, POS_RANGE,
                               POSITIONAL, PROMOTED, VARIANT_TOKENS, VARIANTS, degenerate_opt, planted_opt, save)

WORDS = ("The cat sat on a mat . Tom ate a big bun and then the tall dog bit the ball . That is "
         "it ! Then Ted told a tale to the Baker , but the bat flew at the table . Aha , oh !").split()


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("story") / "story.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    return path


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory, story):
    tmp = tmp_path_factory.mktemp("analyses")
    model_dir = save(planted_opt(), tmp / "model")
    cache = tmp / "c.h5"
    record_tiny(cache, model_dir, [story], tokens=4096, seq_len=64, batch_tokens=128, shard_tokens=1024,
                ngram_max_freq=1.0)
    status = analyze(cache, log=lambda _m: None)
    assert set(status.values()) == {"computed"}
    return cache, model_dir


@pytest.fixture(scope="module")
def layer0(planted_cache):
    with CacheReader(planted_cache[0]) as reader:
        table = neuron_table(reader, [0])
    return {row["neuron"]: row for row in table.rows()}


def tokens(*ids):
    return sorted(chr(i) for i in ids)


def test_token_detectors_found_exactly(layer0):
    detectors = {n for n, row in layer0.items() if row["token_detector"]}
    assert detectors == {DETECTOR, VARIANTS, BOS_AND_A}
    assert sorted(layer0[DETECTOR]["trigger_tokens"]) == tokens(*DETECTED)
    assert sorted(layer0[VARIANTS]["trigger_tokens"]) == tokens(*VARIANT_TOKENS)  # a word's variants
    assert layer0[DETECTOR]["unigram_coverage"] == 2


def test_bigram_detector(layer0):
    """BIGRAM fires on 'h' only after 't' (its attention head looks one token back)."""
    row = layer0[BIGRAM]
    assert row["bigram_detector"] is True and row["trigger_bigrams"] == ["th"]
    assert row["token_detector"] is False  # 'h' also follows 'T' and 'a' without it firing
    assert all("h" not in row["trigger_tokens"] for row in layer0.values())


def test_many_token_neuron_is_not_a_detector(layer0):
    row = layer0[MANY]
    assert row["token_detector"] is False and row["unigram_coverage"] > 5


def test_start_token_is_not_a_trigger(layer0):
    """BOS_AND_A fires on the start token and on 'a', 'b': only those count (the paper excludes BOS)."""
    row = layer0[BOS_AND_A]
    assert sorted(row["trigger_tokens"]) == tokens(*DETECTED) and row["unigram_coverage"] == 2
    assert row["fire_freq"] > 0


def test_dead_neuron(layer0):
    row = layer0[DEAD]
    assert row["dead"] and row["fire_freq"] == 0 and row["unigram_coverage"] == 0
    assert row["token_detector"] is False and not row["positional"]


def test_detector_suppresses_its_triggers(layer0):
    row = layer0[DETECTOR]
    assert row["suppresses_z"] is True and row["suppresses_logit"] is True
    assert chr(PROMOTED) in row["top_promoted"][:3]
    assert set(tokens(*DETECTED)) <= set(row["top_suppressed"][:5])
    assert row["trigger_logit_z"] < -3  # the triggers sit far below the vocabulary's mean
    assert row["trigger_g"] > 0  # ReLU: g is positive wherever the neuron fires
    assert layer0[MANY]["suppresses_z"] is None and layer0[MANY]["suppresses_logit"] is None  # not a detector


def test_positional_neurons_classified(layer0, planted_cache):
    # BOS_AND_A always fires at position 0 (the start token): by the MI it may count as positional
    positional = {n for n, row in layer0.items() if row["positional"]} - {BOS_AND_A}
    assert positional == {POSITIONAL, OSCILLATING, ONE_SIDED}
    assert (layer0[POSITIONAL]["pos_type"], layer0[POSITIONAL]["pos_strong"]) == ("both_extremes", True)
    assert layer0[POSITIONAL]["pos_ranges"] == [f"{POS_RANGE[0]}-{POS_RANGE[1] - 1}"]
    assert (layer0[OSCILLATING]["pos_type"], layer0[OSCILLATING]["pos_strong"]) == ("oscillatory", True)
    assert layer0[OSCILLATING]["pos_ranges"] == ["0-7", "16-23", "32-39", "48-55"]
    assert (layer0[ONE_SIDED]["pos_type"], layer0[ONE_SIDED]["pos_strong"]) == ("one_extreme", True)
    assert layer0[DETECTOR]["pos_type"] == ""


def test_mutual_information_matches_hand_computation(layer0, planted_cache):
    from ffnscope.cache import analysis_store as store

    with CacheReader(planted_cache[0]) as reader:
        counts = reader.array(0, "pos_fire")[:, ONE_SIDED]
        n_seqs = reader.n_tokens // reader.meta["data"]["seq_len"]
        pos = store.read_group(reader, "positional")
    fr_pos = [c / n_seqs for c in counts]
    fr = sum(fr_pos) / len(fr_pos)

    def term(p, q):
        return 0.0 if p == 0 else p * math.log(p / q)

    mi = sum(term(p, fr) + term(1 - p, 1 - fr) for p in fr_pos) / len(fr_pos)
    assert pos["mi_plugin"][0][ONE_SIDED] == pytest.approx(mi, rel=1e-9)  # the paper's formula
    # pos_mi is that less its chance level (engine.analysis.positional.chance_mi)
    assert layer0[ONE_SIDED]["pos_mi"] == pytest.approx(mi - pos["mi_chance"][0][ONE_SIDED], rel=1e-9)
    assert mi > 0.05


def test_layer_table_and_ensemble(planted_cache):
    with CacheReader(planted_cache[0]) as reader:
        rows = list(layer_table(reader).rows())
    first = rows[0]
    assert first["token_detectors"] == 3 and first["detected_tokens"] == 4  # a, b, t, T
    assert first["new_tokens"] == 4 and first["cumulative_tokens"] >= 4
    assert first["pos_oscillatory"] == 1 and first["pos_both_extremes"] == 1 and first["pos_one_extreme"] == 1
    assert 0 < first["dead_frac"] < 1
    assert [r["ngram_layer"] for r in rows] == [True, True, False, False]
    # a layer without token detectors has no suppression share (not 0 %), as the app's per-layer figures say
    for key in ("suppress_frac_logit", "suppress_frac_z"):
        assert [r[key] is None for r in rows] == [r["token_detectors"] in (0, None) for r in rows]
        assert rows[0][key] is not None and any(r[key] is None for r in rows)


def test_analyze_recomputes_only_what_is_stale(planted_cache):
    cache = planted_cache[0]
    assert set(analyze(cache, log=lambda _m: None).values()) == {"current"}
    status = analyze(cache, settings=["positional.mi_threshold=0.5"], log=lambda _m: None)
    assert status == {"dead": "current", "ngrams": "current", "positional": "computed", "suppression": "current"}
    status = analyze(cache, settings=["min_occurrences=3", "positional.mi_threshold=0.5"], log=lambda _m: None)
    assert status["ngrams"] == "computed" and status["suppression"] == "computed"  # built on ngrams
    analyze(cache, log=lambda _m: None)  # back to defaults for the other tests


def test_skipped_neurons_are_never_non_detectors(tmp_path, planted_cache, story):
    """With an n-gram limit, a frequent neuron's counts are not kept: no detector verdict at all."""
    cache = tmp_path / "limited.h5"
    record_tiny(cache, planted_cache[1], [story], tokens=2048, seq_len=64, batch_tokens=128, ngram_max_freq=0.2)
    analyze(cache, log=lambda _m: None)
    with CacheReader(cache) as reader:
        rows = {row["neuron"]: row for row in neuron_table(reader, [0]).rows()}
        counted = reader.ngram_counted(0)
    assert not counted[MANY] and counted[DETECTOR]
    assert rows[MANY]["token_detector"] is None and rows[MANY]["unigram_coverage"] is None
    assert rows[MANY]["ngram_counted"] is False
    assert rows[DETECTOR]["token_detector"] is True
    skipped = [row for row in rows.values() if row["ngram_counted"] is False]
    assert skipped and all(row["token_detector"] is None for row in skipped)


def test_degenerate_layers(tmp_path, story):
    """An all-dead layer and a neuron firing on every token: sane numbers, no warnings."""
    model_dir = save(degenerate_opt(), tmp_path / "model")
    cache = tmp_path / "c.h5"
    record_tiny(cache, model_dir, [story], tokens=1024, ngram_max_freq=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analyze(cache, log=lambda _m: None)
        with CacheReader(cache) as reader:
            rows = {row["neuron"]: row for row in neuron_table(reader, [0]).rows()}
            layers = list(layer_table(reader).rows())
    assert rows[0]["fire_freq"] == 1.0 and rows[0]["token_detector"] is False
    assert rows[0]["pos_mi"] == 0.0 and not rows[0]["positional"]
    assert all(rows[n]["dead"] for n in range(1, 64))
    assert layers[0]["dead_frac"] == pytest.approx(63 / 64)
    assert np.isfinite(layers[0]["alive_freq"])
