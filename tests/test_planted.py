"""Planted neurons in a tiny OPT are recorded exactly."""
import numpy as np
import pytest

from tests.helpers import record_tiny
from tests.tiny_models import DEAD, DETECTED, DETECTOR, POS_RANGE, POSITIONAL, planted_opt, save


@pytest.fixture(scope="module")
def planted_state(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("planted")
    model_dir = save(planted_opt(), tmp / "model")
    return record_tiny(tmp / "c.h5", model_dir, [text_file], tokens=1024, ngram_max_freq=0.5)


def test_dead_neuron_never_fires(planted_state):
    layer = planted_state.layers[0]
    assert (layer.fire_count[:, DEAD] == 0).all()
    assert layer.pos_fire[:, DEAD].sum() == 0
    assert (planted_state.layers[0].fire_count[0] > 0).sum() > 10  # the others are alive


def test_token_detector_counts_equal_token_counts(planted_state):
    layer, data = planted_state.layers[0], planted_state.data
    assert planted_state.meta["recording"]["primary_tau"] == 0.0  # ReLU: the paper's rule
    assert layer.ngram_counted[DETECTOR]
    uni = layer.ngrams[1]
    mine = uni.neuron == DETECTOR
    assert dict(zip(uni.gram[mine].tolist(), uni.count[mine].tolist())) == \
        {t: int(data.unigram[t]) for t in DETECTED}
    assert all(data.unigram[t] > 10 for t in DETECTED)
    total = int(np.isin(data.tokens, DETECTED).sum())
    assert layer.fire_count[0, DETECTOR] == total


def test_positional_neuron_counts_are_exact(planted_state):
    layer = planted_state.layers[0]
    n_seqs = planted_state.data.tokens.shape[0]
    expected = np.zeros(planted_state.data.tokens.shape[1], np.int64)
    expected[POS_RANGE[0]:POS_RANGE[1]] = n_seqs
    np.testing.assert_array_equal(layer.pos_fire[:, POSITIONAL], expected)


def test_vocabulary_is_stored_exactly(planted_state, tmp_path_factory):
    from ffnscope.cache.store import read_state

    vocab = planted_state.vocab
    assert len(vocab) == planted_state.meta["model"]["vocab_size"]
    assert vocab[ord("a")] == "a" and vocab[0] == "\x00" and vocab[ord("\n")] == "\n"
    path = next(tmp_path_factory.getbasetemp().glob("planted*/c.h5"))
    assert read_state(path, "testing").vocab == vocab
