"""Positional neurons: planted behaviours are found exactly, MI matches a hand computation, its
chance level is exact, and neurons whose firing does not depend on position are not flagged however
few sequences were recorded."""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from ffnscope.cache import analysis_store as store
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.positional import (PositionalParams, call_limit, chance_mi, kl_moments, mutual_information,
                                        positional_layer, stored_note)
from ffnscope.engine.analysis.job import analyze
from tests.helpers import record_tiny
from tests.tiny_models import DETECTOR, MANY, ONE_SIDED, OSCILLATING, POSITIONAL, VARIANTS, planted_opt, save

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
    assert res.mi_plugin[col["one_sided"]] == pytest.approx(total / T, rel=1e-12)
    # 1000 sequences per position: the chance level is Miller-Madow's (T - 1) / (2 N) to within 1 %
    assert res.mi_chance[col["one_sided"]] == pytest.approx((T - 1) / (2 * N_SEQS * T), rel=0.01)
    assert res.mi[col["one_sided"]] == res.mi_plugin[col["one_sided"]] - res.mi_chance[col["one_sided"]]


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


# --- chance level, null and the limit on calls ------------------------------------------------------
def _binomial(n: int, q: float) -> np.ndarray:
    return np.array([math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(n + 1)])


def test_chance_mi_is_the_exact_mean_of_the_plugin_mi():
    """Enumerate every table of fire counts for 3 positions x 2 sequences: the expected plug-in MI of a
    neuron firing at rate q regardless of position is what chance_mi says, exactly."""
    n, T = 2, 3
    for q in (0.05, 0.3, 0.5, 0.9):
        pmf = _binomial(n, q)
        expected = 0.0
        for counts in itertools.product(range(n + 1), repeat=T):
            fr_pos = np.array(counts, float)[:, None] / n
            expected += np.prod(pmf[list(counts)]) * mutual_information(fr_pos, fr_pos.mean(axis=0))[0]
        mean, _ = chance_mi(n, T, np.array([q]))
        assert mean[0] == pytest.approx(expected, rel=1e-9), q


@pytest.mark.parametrize("m, q", [(8, 0.3), (300, 0.01), (300, 0.5), (5000, 0.3), (100000, 1e-4)])
def test_kl_moments_match_a_full_sum(m, q):
    """Exact window sums and the large-m expansion against the sum over all counts."""
    k = np.arange(m + 1)
    log_pmf = np.array([math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1) for j in k]) \
        + k * math.log(q) + (m - k) * math.log1p(-q)
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    x = k / m
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(x > 0, x * np.log(x / q), 0) + np.where(x < 1, (1 - x) * np.log((1 - x) / (1 - q)), 0)
    mean, var = kl_moments(m, np.array([q]))
    assert mean[0] == pytest.approx((pmf * kl).sum(), rel=1e-4)
    assert var[0] == pytest.approx((pmf * (kl - (pmf * kl).sum()) ** 2).sum(), rel=1e-3)


def test_null_quantile_holds_its_level():
    """20,000 neurons at a constant rate, 16 sequences per position: about 0.1 % beat the null's
    99.9 % quantile (the gamma approximation of the plug-in MI's chance distribution is right)."""
    rng = np.random.default_rng(1)
    res = positional_layer(rng.binomial(16, 0.3, size=(64, 20000)), 16)
    beats = int((res.mi_plugin > res.mi_null).sum())
    assert 5 <= beats <= 60  # expected 20
    assert res.mi_chance.mean() == pytest.approx(res.mi_plugin.mean(), rel=0.01)


def _null_and_planted(rng, n_seqs: int, T: int, d: int) -> np.ndarray:
    """d neurons firing at a constant rate (0.05 to 0.5) at every position, then a step and an
    oscillating indicator."""
    null = rng.binomial(n_seqs, rng.uniform(0.05, 0.5, d)[None, :], size=(T, d))
    pos = np.arange(T)[:, None]
    return np.concatenate([null, n_seqs * (pos < T // 2), n_seqs * (pos // 8 % 2 == 0)], axis=1)


def test_constant_rate_neurons_are_not_flagged_few_sequences():
    """The quick start's 8 sequences per position (here 512 positions): the plug-in MI of neurons whose
    firing does not depend on position is ~ 1/(2 * 8) > 0.05, so the paper's rule flags most of them.
    Corrected for chance, none passes; and 8 sequences are too few to call anything at 0.05."""
    rng = np.random.default_rng(0)
    d = 4608
    res = positional_layer(_null_and_planted(rng, 8, 512, d), 8)
    assert (res.mi_plugin[:d] > 0.05).sum() > d // 2           # the uncorrected rule: thousands flagged
    assert ((res.mi[:d] > 0.05) | (res.mi_plugin[:d] > res.mi_null[:d])).sum() <= 10  # corrected: noise
    assert not ((res.mi[:d] > 0.05) & (res.mi_plugin[:d] > res.mi_null[:d])).any()
    assert res.limit.too_few and not res.positional.any()     # not even the perfect indicators
    assert res.limit.message().startswith("too few sequences per position (8) to call positional neurons")


def test_constant_rate_neurons_are_not_flagged_enough_sequences():
    """12 sequences per position over 64 positions: enough to call positional neurons, yet chance MI
    (~0.043) plus its spread puts a large share of constant-rate neurons above 0.05. Only the planted
    indicators are flagged."""
    rng = np.random.default_rng(2)
    d = 4608
    res = positional_layer(_null_and_planted(rng, 12, 64, d), 12)
    assert (res.mi_plugin[:d] > 0.05).sum() > d // 20          # the uncorrected rule: hundreds flagged
    assert not res.limit.too_few and res.limit.message() == ""
    assert list(np.flatnonzero(res.positional)) == [d, d + 1]
    assert (res.kind[d], res.kind[d + 1]) == ("both_extremes", "oscillatory")


@pytest.mark.parametrize("T", [16, 64, 2048])
def test_call_limit(T):
    """Too few sequences at tiny numbers, enough at large; the limit is the boundary, and at the
    fewest sequences that allow a call chance MI is below the threshold."""
    limit = call_limit(1, T)
    assert limit.too_few and 1 < limit.min_seqs <= 64
    assert not call_limit(256, T).too_few
    for n in range(1, limit.min_seqs + 4):
        assert call_limit(n, T).too_few == (n < limit.min_seqs), n
    assert call_limit(limit.min_seqs, T).chance_mi < 0.05 <= call_limit(1, T).chance_mi
    # a higher threshold needs fewer sequences
    assert call_limit(1, T, PositionalParams(mi_threshold=0.2)).min_seqs < limit.min_seqs


def test_call_limit_edges():
    assert call_limit(8, 2048).too_few and call_limit(8, 2048).chance_mi > 0.06  # the quick start
    assert call_limit(1000, 1).min_seqs == -1 and call_limit(1000, 1).too_few   # one position: no MI
    assert "no number of sequences" in call_limit(1000, 1).message()


# --- through a recording ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    return save(planted_opt(), tmp_path_factory.mktemp("positional") / "model")


def _recorded(tmp_path, model_dir, text_file, n_seqs: int, seq_len: int = 32, only=("positional",)):
    cache = tmp_path / f"c{n_seqs}.h5"
    record_tiny(cache, model_dir, [text_file], tokens=n_seqs * seq_len, seq_len=seq_len, ngram_max_freq=1.0)
    analyze(cache, only=list(only) if only else None, log=lambda _m: None)
    with CacheReader(cache) as reader:
        return store.read_group(reader, "positional")


def test_recorded_content_neurons_are_not_positional(tmp_path, planted_model, text_file):
    """12 sequences of 32 tokens: the token detectors and the many-token neuron fire on content, at
    any position (their only position dependence, silence on the start token, is worth < 0.03 nats),
    yet their plug-in MI is above 0.05. They are not flagged; the planted position neurons are."""
    pos = _recorded(tmp_path, planted_model, text_file, 12)
    content = [DETECTOR, VARIANTS, MANY]
    assert (pos["mi_plugin"][0][content] > 0.05).all()    # the paper's rule would flag them
    assert not pos["positional"][0][content].any()
    assert pos["positional"][0][[POSITIONAL, OSCILLATING, ONE_SIDED]].all()
    assert not pos["too_few"] and int(pos["n_seqs"]) == 12 and stored_note(pos) == ""


def test_recorded_too_few_sequences(tmp_path, planted_model, text_file):
    """8 sequences of 32 tokens: nothing is called, and the stored result says why."""
    pos = _recorded(tmp_path, planted_model, text_file, 8)
    assert pos["too_few"] and int(pos["n_seqs"]) == 8 and int(pos["min_seqs"]) > 8
    assert not pos["positional"].any() and pos["mi"].shape == pos["mi_plugin"].shape
    assert stored_note(pos).startswith("too few sequences per position (8) to call positional neurons")
    assert stored_note({}) == ""  # results stored before the limit existed


def test_views_say_too_few(tmp_path, planted_model, text_file, capsys):
    """Report, info, export, the neuron index and the neuron detail all carry the note."""
    from rich.console import Console

    from ffnscope.app.export_view import run_export
    from ffnscope.app.info_view import print_info
    from ffnscope.app.report_view import print_report
    from ffnscope.app.tui.detail import summary_text
    from ffnscope.engine.explore.detail import neuron_detail
    from ffnscope.engine.explore.index import NeuronIndex

    note = "too few sequences per position (8) to call positional neurons"
    _recorded(tmp_path, planted_model, text_file, 8, only=None)
    cache = tmp_path / "c8.h5"
    for show in (lambda c: print_report([cache], c), lambda c: print_info(cache, c)):
        console = Console(record=True, width=300)
        show(console)
        assert note in console.export_text(), show
    args = SimpleNamespace(file=cache, layers=None, table="neurons", dead=None, detector=None, positional="any",
                           where=None, out=tmp_path / "x.csv", format="csv", force=False)
    run_export(args)
    assert note in capsys.readouterr().out
    with CacheReader(cache) as reader:
        index = NeuronIndex(reader)
        assert index.pos_note.startswith(note)
        assert note in summary_text(neuron_detail(reader, index, POSITIONAL)).plain
