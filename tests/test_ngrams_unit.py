"""Coverage numbers and detector rules on hand-built counts."""
import numpy as np

from ffnscope.cache.state import GramCounts, Sparse
from ffnscope.engine.analysis.ngrams import NgramParams, coverage_histogram, coverage_numbers, ensemble, ngram_layer


def sparse(rows):
    gram, neuron, count = zip(*rows)
    return Sparse.reduce([Sparse(np.array(gram, np.int64), np.array(neuron, np.int32), np.array(count, np.int64))])


def test_coverage_numbers_by_hand():
    s = sparse([(1, 0, 50), (2, 0, 30), (3, 0, 15), (4, 0, 5), (7, 1, 96), (8, 1, 4)])
    fires, coverage = coverage_numbers(s, 3, 0.95)
    assert fires.tolist() == [100, 100, 0]
    assert coverage.tolist() == [3, 1, 0]  # 50+30+15 = 95 %; 96 %; never fired


def test_detector_rules():
    # neuron 0 fires on every occurrence of grams 1 and 2 (a detector); neuron 1 on gram 3 but only on
    # half its occurrences; neuron 2 on gram 9, seen only twice (below min_occurrences)
    s = sparse([(1, 0, 60), (2, 0, 40), (3, 1, 50), (9, 2, 2)])
    grams = GramCounts(np.array([1, 2, 3, 9], np.int64), np.array([60, 40, 100, 2], np.int64))
    counted = np.array([True, True, True, False])
    r = ngram_layer(s, grams, counted, 1, NgramParams())
    assert r.detector.tolist() == [True, False, False, False]
    assert r.coverage.tolist() == [2, 1, 1, -1]  # neuron 3 was not counted: -1, never 0
    assert list(zip(r.covered_neuron.tolist(), r.covered_gram.tolist())) == [(0, 1), (0, 2)]
    assert coverage_histogram(r.coverage)[0] == 3


def test_ensemble_counts():
    rows = ensemble([{1, 2}, {2, 3}, {1, 4}])
    assert rows == [{"detected": 2, "new_overall": 2, "new_vs_previous": 2, "cumulative": 2},
                    {"detected": 2, "new_overall": 1, "new_vs_previous": 1, "cumulative": 3},
                    {"detected": 2, "new_overall": 1, "new_vs_previous": 2, "cumulative": 4}]


def test_detector_fire_bound_by_hand():
    """max over n of ceil(top-k occurrences / coverage) + the start-token positions of order n."""
    from ffnscope.engine.analysis.ngrams import detector_fire_bound, skip_status

    params = NgramParams(max_coverage_1=2, max_coverage_2=3, max_coverage_3=1)
    counts = {1: np.array([50, 0, 30, 10, 5]), 2: np.array([20, 20, 19, 2]), 3: np.array([7, 3])}
    bound = detector_fire_bound(counts, n_seqs=4, seq_len=10, first_pos=1, params=params)
    # tokens: ceil(80 / 0.95) = 85, + 4 x 1; bigrams: ceil(59 / 0.95) = 63, + 4 x 2; trigrams: ceil(7/.95)=8, + 12
    assert bound["per_order"] == {"1": 89, "2": 71, "3": 20}
    assert bound["fires"] == 89 and bound["tokens"] == 40 and bound["top_occurrences"]["2"] == 59
    # 89 fires (the bound) may still make a detector; 90 cannot: skipped with proof. A skipped neuron
    # within the bound is unproven, and so is every skipped one when no bound is stored (older caches)
    counted = np.array([True, False, False, True])
    fires = np.array([89, 90, 89, 3])
    assert skip_status(counted, fires, bound) == {"counted": 2, "proven": 1, "unproven": 1}
    assert skip_status(counted, fires, None) == {"counted": 2, "proven": 0, "unproven": 2}
