"""Positional neurons: planted behaviours are found exactly, MI matches a hand computation."""
import math

import numpy as np
import pytest

from engine.analysis.positional import PositionalParams, mutual_information, positional_layer

pytestmark = pytest.mark.filterwarnings("error")  # dead / always-on must not warn

T, N_SEQS = 1024, 1000
POS = np.arange(T)
OSC_RANGES = [(a, min(a + 100, T)) for a in range(0, T, 200)]  # [0,100), [200,300), ..., [1000,1024)


def planted() -> tuple[list[str], np.ndarray]:
    """One column per behaviour: fr(pos) curves turned into fire counts out of N_SEQS."""
    rng = np.random.default_rng(0)
    curves = {
        "oscillatory": (POS // 100 % 2 == 0).astype(float),  # exactly 1 on the planted ranges, 0 elsewhere
        "step": (POS < 300).astype(float),                                  # always on before 300, never after
        "weak_step": np.where(POS < 300, 0.97, 0.02),
        "one_sided": np.where(POS < 200, 0.0, 0.45 + 0.15 * np.sin(POS / 40)),  # 0.3-0.6 after 200
        "smooth": 0.5 + 0.3 * np.sin(2 * np.pi * POS / 512),               # between 0.2 and 0.8
        # Uniform noise of +-0.2 around a 0.2 -> 0.8 ramp: the ramp gives I ~ 0.07 > 0.05.
        "noisy": np.clip(0.2 + 0.6 * POS / (T - 1) + rng.uniform(-0.2, 0.2, T), 0.2, 0.8),
        "dead": np.zeros(T),
        "always_on": np.ones(T),
    }
    names = list(curves) + ["content"]
    pos_fire = np.empty((T, len(names)), dtype=np.int64)
    for j, name in enumerate(curves):
        pos_fire[:, j] = np.round(curves[name] * N_SEQS)
    pos_fire[:, -1] = rng.binomial(N_SEQS, 0.3, T)  # same rate at every position: sampling noise only
    return names, pos_fire


@pytest.fixture(scope="module")
def result():
    names, pos_fire = planted()
    with np.errstate(all="raise"):  # any unguarded 0/0 or log 0 would raise here
        res = positional_layer(pos_fire, N_SEQS)
    return {name: j for j, name in enumerate(names)}, pos_fire, res


EXPECTED = {  # name -> (kind, strong)
    "oscillatory": ("oscillatory", True),
    "step": ("both_extremes", True),
    "weak_step": ("both_extremes", False),
    "one_sided": ("one_extreme", True),
    "smooth": ("other", True),
    "noisy": ("other", False),
}


def test_finds_exactly_the_planted_neurons(result):
    col, _, res = result
    assert set(np.flatnonzero(res.positional)) == {col[name] for name in EXPECTED}
    for name, (kind, strong) in EXPECTED.items():
        assert (res.kind[col[name]], bool(res.strong[col[name]])) == (kind, strong), name
    for name in ("content", "dead", "always_on"):
        assert res.kind[col[name]] == "" and not res.strong[col[name]]


def test_mi_values(result):
    col, _, res = result
    assert res.mi.dtype == np.float64 and np.isfinite(res.mi).all()
    assert res.mi[col["dead"]] == 0.0 and res.mi[col["always_on"]] == 0.0
    assert res.mi[col["content"]] < 0.005
    # The strong indicators carry most information, "other" the least (paper, Sec. 5.2).
    assert res.mi[col["oscillatory"]] > res.mi[col["step"]] > res.mi[col["smooth"]] > 0.05


def test_mi_matches_hand_computation(result):
    col, pos_fire, res = result
    counts = [int(c) for c in pos_fire[:, col["one_sided"]]]  # has fr(pos) = 0: uses 0 log 0 = 0
    fr_pos = [c / N_SEQS for c in counts]
    fr = sum(fr_pos) / T
    total = 0.0
    for f in fr_pos:
        if f > 0:
            total += f * math.log(f / fr)
        if f < 1:
            total += (1 - f) * math.log((1 - f) / (1 - fr))
    assert res.mi[col["one_sided"]] == pytest.approx(total / T, rel=1e-12)


def test_ranges_of_strong_indicators(result):
    col, _, res = result
    assert res.ranges[col["oscillatory"]] == OSC_RANGES
    assert res.ranges[col["step"]] == [(0, 300)]
    assert set(res.ranges) == {col["oscillatory"], col["step"]}  # the weak step gets none


def test_mutual_information_edge_cases():
    fr_pos = np.array([[0.0, 1.0, 0.0, 0.5], [0.0, 1.0, 1.0, 0.5]])
    mi = mutual_information(fr_pos, fr_pos.mean(axis=0))
    np.testing.assert_allclose(mi, [0.0, 0.0, math.log(2), 0.0], atol=1e-15)


def test_params_change_the_verdicts():
    names, pos_fire = planted()
    window = np.zeros((T, 1), dtype=np.int64)
    window[300:600] = N_SEQS  # off, on, off: one window, not repeated
    assert positional_layer(window, N_SEQS).kind[0] == "both_extremes"
    assert positional_layer(window, N_SEQS, PositionalParams(min_alternations=3)).kind[0] == "oscillatory"
    # With a tolerance below 0.03 the weak step's 0.97 / 0.02 plateaus are no longer "near" 0 or 1.
    weak = pos_fire[:, [names.index("weak_step")]]
    assert positional_layer(weak, N_SEQS, PositionalParams(extreme_eps=0.01)).kind[0] == "other"
    assert not positional_layer(pos_fire, N_SEQS, PositionalParams(mi_threshold=1.0)).positional.any()
    assert PositionalParams().as_dict()["mi_threshold"] == 0.05


def test_bad_input():
    with pytest.raises(ValueError):
        positional_layer(np.zeros((4, 2), dtype=np.int64), 0)
    with pytest.raises(ValueError):
        positional_layer(np.full((4, 2), 3), 2)
