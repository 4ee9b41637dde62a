"""Activation samples hold any finite g: a neuron with g = 1e6 (past float16's 65504) is stored as such,
and caches of the float16 samples written before still read (as float32)."""
import numpy as np
import pytest
import torch

from ffnscope.cache.state import Samples
from ffnscope.cache.store import read_state
from tests.helpers import record_tiny
from tests.tiny_models import build, save

BIG, BIG_G = 3, 1e6  # the planted neuron of layer 1 and its g at every token


@pytest.fixture(scope="module")
def big_state(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("big")
    model = build("opt", n_layers=2)
    with torch.no_grad():
        fc1, fc2 = model.model.decoder.layers[1].fc1, model.model.decoder.layers[1].fc2
        fc1.weight[BIG].zero_()
        fc1.bias[BIG] = BIG_G  # ReLU(1e6): g = 1e6 whatever the input
        fc2.weight[:, BIG] = 0.0  # the residual stream never sees it
    out = tmp / "c.h5"
    return record_tiny(out, save(model, tmp / "model"), [text_file], tokens=1024, samples=64), out


def test_a_g_of_a_million_is_sampled_as_such(big_state):
    state, out = big_state
    for acts in (state.samples.acts, read_state(out, "testing").samples.acts):
        assert acts.shape[1] > 0
        assert np.isfinite(acts).all()
        np.testing.assert_allclose(acts[1, :, BIG], BIG_G, rtol=1e-6)


def test_float16_samples_of_older_caches_read_as_float32():
    old = Samples(np.array([1, 5]), np.ones((2, 2, 3), np.float16))
    assert old.acts.dtype == np.float32
    old.add(Samples(np.array([3]), np.full((2, 1, 3), BIG_G, np.float32)))
    assert old.acts.dtype == np.float32 and (old.acts[:, 1] == BIG_G).all() and (old.acts[:, [0, 2]] == 1).all()


def test_shards_append_in_the_room_reserved():
    """Shards in data order are appended: with room reserved nothing held moves; out of order, sorted in."""
    samples = Samples(np.zeros(0, np.int64), np.zeros((2, 0, 3), np.float32))
    samples.reserve(6)
    room = samples._acts._buffer.ctypes.data
    for lo in (0, 10, 20):
        samples.add(Samples(np.array([lo, lo + 1]), np.full((2, 2, 3), lo, np.float32)))
    assert samples._acts._buffer.ctypes.data == room
    assert samples.index.tolist() == [0, 1, 10, 11, 20, 21]
    assert samples.acts[1, :, 0].tolist() == [0, 0, 10, 10, 20, 20]
    samples.add(Samples(np.array([5, 30]), np.full((2, 2, 3), 5, np.float32)))  # past the room, out of order
    assert samples.index.tolist() == [0, 1, 5, 10, 11, 20, 21, 30] and samples.acts[0, :, 0].tolist() == \
        [0, 0, 5, 10, 10, 20, 20, 5]
