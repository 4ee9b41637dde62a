"""The numpy neuron index behind the TUI agrees with the exported neuron table filtered by the
export's own expression language (an independent implementation)."""
from __future__ import annotations

import numpy as np
import pytest

from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore.detail import neuron_detail
from ffnscope.engine.explore.index import NeuronFilter, NeuronIndex
from ffnscope.engine.explore.tables import neuron_table
from ffnscope.engine.table.filter import filter_rows
from tests.helpers import HOSTILE
from tests.tiny_models import DETECTOR, POSITIONAL

CASES = [
    (NeuronFilter(dead=True), "dead"),
    (NeuronFilter(dead=False), "not dead"),
    (NeuronFilter(detector="token"), "token_detector"),
    (NeuronFilter(detector="bigram", layers=(0,)), "bigram_detector and layer == 0"),
    (NeuronFilter(detector="any"), "token_detector or bigram_detector or trigram_detector"),
    (NeuronFilter(positional="any"), "positional"),
    (NeuronFilter(positional="both_extremes", strong_only=True), "positional and pos_type == 'both_extremes' and pos_strong"),
    (NeuronFilter(freq=(0.1, 0.3)), "fire_freq >= 0.1 and fire_freq <= 0.3"),
    (NeuronFilter(mi=(0.05, None), layers=(1, 3)), "pos_mi >= 0.05 and layer in (1, 3)"),
]


@pytest.fixture(scope="module")
def index_and_table(hostile_cache):
    with CacheReader(hostile_cache) as reader:
        yield NeuronIndex(reader), neuron_table(reader), reader


@pytest.mark.parametrize("f,expr", CASES, ids=[c[1] for c in CASES])
def test_filters_match_the_export_language(index_and_table, f, expr):
    index, table, _ = index_and_table
    want = np.flatnonzero(filter_rows(table, expr))
    got = index.select(f)
    assert len(want), f"the planted recording should have rows for {expr}"
    np.testing.assert_array_equal(got, want)


def test_trigger_search_and_sorting(index_and_table):
    index, table, _ = index_and_table
    hits = index.select(NeuronFilter(trigger="[BOLD]"))
    assert len(hits) and all(any("[bold]" in t.lower() for n in (1, 2, 3) for t in index.triggers[n].get(r))
                             for r in hits)
    detector_row = index.rows_of(np.array([0]), np.array([DETECTOR]))[0]
    assert detector_row in hits
    rows = index.select(NeuronFilter(), "pos_mi", descending=True)
    mi = table["pos_mi"][rows]
    assert np.all(np.diff(mi) <= 0) and sorted(rows.tolist()) == list(range(len(table)))
    # unknown values sort last either way
    for descending in (False, True):
        rows = index.select(NeuronFilter(), "unigram_coverage", descending)
        known = [c is not None for c in table["unigram_coverage"][rows]]
        assert known == sorted(known, reverse=True)


def test_detail_of_planted_neurons(index_and_table):
    index, _, reader = index_and_table
    row = int(index.rows_of(np.array([0]), np.array([DETECTOR]))[0])
    detail = neuron_detail(reader, index, row)
    assert sorted(t for t, _ in detail.triggers[1]) == sorted(HOSTILE.values())
    assert abs(sum(s for _, s in detail.triggers[1]) - 1.0) < 0.06  # the triggers cover >= 95 % of firings
    assert detail.stats["token_detector"] is True and detail.promoted and detail.suppressed
    assert detail.contexts and all(c.token in HOSTILE.values() for c in detail.contexts)
    values = [c.value for c in detail.contexts]
    assert values == sorted(values, reverse=True)
    row = int(index.rows_of(np.array([0]), np.array([POSITIONAL]))[0])
    detail = neuron_detail(reader, index, row)
    on = np.flatnonzero(detail.pos_freq > 0.5)
    assert on.min() == 8 and on.max() == 19  # the planted range indicator fires at positions 8-19
    assert detail.pos_ranges == ["8-19"]


def test_sorting_by_flags_and_types(index_and_table):
    index, table, _ = index_and_table
    rows = index.select(NeuronFilter(), "token_detector", descending=True)
    flags = [table["token_detector"][r] for r in rows]
    n_true = sum(f is True for f in flags)
    assert n_true and all(f is True for f in flags[:n_true])          # detectors first
    assert all(f is None for f in flags[len(flags) - sum(f is None for f in flags):])  # unknown last
    rows = index.select(NeuronFilter(), "pos_type")
    types = [table["pos_type"][r] for r in rows]
    n_pos = sum(bool(t) for t in types)
    assert all(types[:n_pos]) and not any(types[n_pos:])              # not positional last
    assert types[:n_pos] == sorted(types[:n_pos], key=["oscillatory", "both_extremes", "one_extreme", "other"].index)
