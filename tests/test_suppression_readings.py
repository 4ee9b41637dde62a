"""Suppression in both readings (engine.analysis.suppression): the raw logit contribution of a
detector's update at its triggers (the paper's, `trigger_logit`, `suppresses_logit`) and the same as
a z-score against the vocabulary (`trigger_logit_z`, `suppresses_z`). Planted in layer 0 of a tiny
Llama whose unembedding gives every token one shared component, so an update can move the whole
vocabulary one way: the two readings then disagree, each in its own direction."""
from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.job import analyze
from ffnscope.engine.analysis.suppression import suppression_layer
from ffnscope.engine.explore.tables import LAYER_KINDS, NEURON_KINDS, layer_table, neuron_table
from ffnscope.engine.table.export import read_back
from tests.conftest import env_for_subprocess
from tests.helpers import record_tiny
from tests.tiny_models import build, save

# layer 0's FFN reads the token embedding alone (o_proj zeroed); every embedding entry is +1 or -1, so
# the RMS norm divides by exactly 1 and each trigger flag reaches the FFN as it is
ONE_DIM = 5                                       # flags 0-4: one per planted neuron's trigger pair
COMMON, OWN = 10, (11, 12, 13, 14, 15)            # unembedding dimensions: shared by all tokens, a pair's own
DOWN, UP, NULL, BOTH, DOWN2 = 5, 6, 7, 8, 9       # planted neurons
TRIGGERS = {DOWN: "ab", UP: "ch", NULL: "os", BOTH: "ei", DOWN2: "rt"}
# each update: (along COMMON, along its triggers' own dimension). COMMON moves every token's logit alike
UPDATES = {DOWN: (-1.0, 0.5),   # all tokens down by ~1, its triggers by only ~0.5: raw < 0 but z > 0
           UP: (1.0, -0.5),     # all tokens up by ~1, its triggers by only ~0.5: raw > 0 but z < 0
           NULL: (0.2, 0.5),    # its triggers up, and more than the rest: suppressed in neither reading
           BOTH: (0.2, -1.0),   # its triggers down, the rest up: suppressed in both
           DOWN2: (-1.0, 0.5)}  # as DOWN: the layer's two shares then differ


def _unembedding(vocab: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Every token has about 1 along COMMON (a spread of 0.1) and 1 along its trigger pair's own
    dimension (0 for the tokens of no pair); the other dimensions stay random (no update reads them)."""
    head = torch.randn(vocab, d, generator=gen)
    head[:, COMMON] = 1.0 + 0.1 * torch.randn(vocab, generator=gen)
    for dim, tokens in zip(OWN, TRIGGERS.values()):
        head[:, dim] = 0.0
        head[[ord(t) for t in tokens], dim] = 1.0
    return head


@torch.no_grad()
def planted_llama():
    """Each planted neuron fires (silu(gate) = 4.97) exactly on its two trigger tokens, with up = 1 so
    g > 0 there; elsewhere silu(-1.28) = -0.28: no fire at tau 1. Its output row is UPDATES'."""
    model = build("llama")
    emb = model.model.embed_tokens.weight
    vocab, d = emb.shape
    gen = torch.Generator().manual_seed(2)
    emb.copy_(torch.where(torch.rand(vocab, d, generator=gen) < 0.5, -1.0, 1.0))
    for flag, tokens in enumerate(TRIGGERS.values()):
        emb[:, flag] = -1.0
        emb[[ord(t) for t in tokens], flag] = 1.0
    emb[:, ONE_DIM] = 1.0
    layer = model.model.layers[0]
    layer.self_attn.o_proj.weight.zero_()
    layer.post_attention_layernorm.weight.fill_(1.0)
    model.model.norm.weight.fill_(1.0)
    mlp = layer.mlp
    for flag, (neuron, (common, own)) in enumerate(UPDATES.items()):
        mlp.gate_proj.weight[neuron].zero_()
        mlp.gate_proj.weight[neuron, flag], mlp.gate_proj.weight[neuron, ONE_DIM] = 3.14, 1.86  # +5 / -1.28
        mlp.up_proj.weight[neuron].zero_()
        mlp.up_proj.weight[neuron, ONE_DIM] = 1.0
        mlp.down_proj.weight[:, neuron] = 0.0
        mlp.down_proj.weight[COMMON, neuron], mlp.down_proj.weight[OWN[flag], neuron] = common, own
    model.lm_head.weight.copy_(_unembedding(vocab, d, gen))
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("readings")
    cache = tmp / "c.h5"
    record_tiny(cache, save(planted_llama(), tmp / "model"), [text_file], tokens=1024, tau=1.0,
                ngram_max_freq=1.0, layers="0-1")
    analyze(cache, log=lambda _m: None)
    with CacheReader(cache) as reader:
        table = neuron_table(reader, [0])
    return cache, {row["neuron"]: row for row in table.rows()}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], capture_output=True, text=True,
                          env=env_for_subprocess(), timeout=300)


def test_projection_gives_each_reading_its_score():
    """suppression_layer on the planted weights as numpy arrays: trigger_logit is the triggers' mean
    logit contribution, trigger_logit_z the same against the vocabulary, each verdict its sign."""
    gen = torch.Generator().manual_seed(2)
    head = _unembedding(259, 32, gen).numpy().astype(np.float64)
    neurons = np.array(list(UPDATES))
    rows = np.zeros((len(UPDATES), 32))
    for i, (common, own) in enumerate(UPDATES.values()):
        rows[i, COMMON], rows[i, OWN[i]] = common, own
    triggers = [np.array([ord(t) for t in tokens]) for tokens in TRIGGERS.values()]
    r = suppression_layer(neurons, triggers, rows, np.ones(len(neurons)), None, head)
    logits = rows @ head.T
    for i in range(len(neurons)):
        mean = logits[i, triggers[i]].mean()
        assert r.trigger_logit[i] == pytest.approx(mean, rel=1e-5)
        assert r.trigger_logit_z[i] == pytest.approx((mean - logits[i].mean()) / logits[i].std(), rel=1e-4)
    np.testing.assert_array_equal(r.suppresses_logit, r.trigger_logit < 0)
    np.testing.assert_array_equal(r.suppresses_z, r.trigger_logit_z < 0)
    assert r.suppresses_logit.tolist() == [True, False, False, True, True]   # DOWN, UP, NULL, BOTH, DOWN2
    assert r.suppresses_z.tolist() == [False, True, False, True, False]


def test_planted_detectors_in_both_readings(planted):
    """Recorded and analysed: each planted neuron is a detector of its pair, and both verdicts are
    exactly the planted ones: the readings disagree on DOWN, DOWN2 and UP, agree on NULL (neither) and BOTH."""
    _, rows = planted
    for neuron, tokens in TRIGGERS.items():
        row = rows[neuron]
        assert row["token_detector"] is True and sorted(row["trigger_tokens"]) == sorted(tokens)
        assert row["trigger_g"] > 0
    verdicts = {n: (rows[n]["suppresses_logit"], rows[n]["suppresses_z"]) for n in UPDATES}
    assert verdicts == {DOWN: (True, False), UP: (False, True), NULL: (False, False), BOTH: (True, True),
                        DOWN2: (True, False)}
    assert rows[DOWN]["trigger_logit"] == pytest.approx(-0.5, abs=0.25) and rows[DOWN]["trigger_logit_z"] > 2
    assert rows[UP]["trigger_logit"] == pytest.approx(0.5, abs=0.25) and rows[UP]["trigger_logit_z"] < -2
    for row in rows.values():  # each flag is exactly the sign of its score; no verdict without a score
        for score, flag in (("trigger_logit", "suppresses_logit"), ("trigger_logit_z", "suppresses_z")):
            assert row[flag] is (None if row[score] is None else row[score] < 0)


def test_layer_shares_name_their_reading(planted):
    cache, rows = planted
    with CacheReader(cache) as reader:
        layer0 = next(layer_table(reader).rows())
    detectors = [r for r in rows.values() if r["token_detector"]]
    for reading in ("logit", "z"):
        share = sum(r[f"suppresses_{reading}"] for r in detectors) / len(detectors)
        assert layer0[f"suppress_frac_{reading}"] == pytest.approx(share)
    assert "suppress_frac" not in LAYER_KINDS and "suppresses_triggers" not in NEURON_KINDS


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_exports_carry_both_scores_and_verdicts(planted, tmp_path, fmt):
    cache, rows = planted
    out = tmp_path / f"n.{fmt}"
    result = run_cli("export", cache, "--layers", "0", "--format", fmt, "--out", out,
                     "--where", "suppresses_logit and not suppresses_z")
    assert result.returncode == 0, result.stderr
    exported = {r["neuron"]: r for r in read_back(out, fmt, NEURON_KINDS)}
    assert {DOWN, DOWN2} <= set(exported) and not {UP, NULL, BOTH} & set(exported)
    for key in ("trigger_logit", "suppresses_logit", "trigger_logit_z", "suppresses_z"):
        assert exported[DOWN][key] == pytest.approx(rows[DOWN][key])


def test_a_result_of_one_reading_is_stale(planted, tmp_path):
    """A suppression result stored before the two readings (one `suppresses`, no trigger_logit) gives
    one line naming `analyze`, and analyze computes it again."""
    cache = tmp_path / "old.h5"
    shutil.copy(planted[0], cache)
    with h5py.File(cache, "a") as f:
        group = f["analysis/suppression"]
        group.move("suppresses_z", "suppresses")
        del group["trigger_logit"], group["suppresses_logit"]
    with CacheReader(cache) as reader, pytest.raises(UserError, match="analyze") as err:
        neuron_table(reader)
    assert "\n" not in str(err.value)
    result = run_cli("export", cache, "--out", tmp_path / "x.csv")
    assert result.returncode == 2 and result.stderr.startswith("ffnscope: error:") and "analyze" in result.stderr
    assert "Traceback" not in result.stderr
    assert analyze(cache, log=lambda _m: None)["suppression"] == "computed"
    with CacheReader(cache) as reader:
        again = {row["neuron"]: row for row in neuron_table(reader, [0]).rows()}
    assert (again[DOWN]["suppresses_logit"], again[DOWN]["suppresses_z"]) == (True, False)


async def test_app_names_the_reading(planted):
    """The layers screen shows the paper's reading by default, titled so, and `s` switches to the
    z-score one; the detail screen gives both verdicts with both scores, each named."""
    from ffnscope.app.tui.app import FFNScopeApp
    from ffnscope.app.tui.detail import DetailScreen
    from ffnscope.app.tui.layers import LayersScreen
    from ffnscope.app.tui.neurons import NeuronsScreen
    from tests.tui_helpers import screen_text, settle, wait_for, wait_screen

    cache, rows = planted
    app = FFNScopeApp([cache], dirs=[])
    async with app.run_test(size=(80, 24)) as pilot:
        layers = await wait_screen(pilot, LayersScreen)
        shares = {r: layers.figures[f"suppress_frac_{r}"][0] for r in ("logit", "z")}
        assert shares["logit"] != shares["z"]  # DOWN2: the planted disagreements do not cancel
        for reading in ("logit", "z"):
            await wait_for(pilot, lambda: f"supp% {reading}" in screen_text(app), what=f"the {reading} title")
            header, row0 = screen_text(app).splitlines()[2:4]
            end = header.index(f"supp% {reading}") + len(f"supp% {reading}")  # right-aligned, 11 wide
            assert row0[end - 11:end].strip() == f"{100 * shares[reading]:.0f}"
            await pilot.press("s")
        await pilot.press("enter")
        neurons = await wait_screen(pilot, NeuronsScreen)
        await settle(pilot)
        neurons.query_one("VirtualTable").cursor = DOWN
        await pilot.press("enter")
        detail = await wait_screen(pilot, DetailScreen)
        await wait_for(pilot, lambda: detail.detail is not None, what="the detail")
        await settle(pilot)
        text = " ".join(screen_text(app).split())
        down = rows[DOWN]
        assert (f"suppresses its triggers: yes by raw logit, the paper's reading (trigger logit "
                f"{down['trigger_logit']:.3f}) · no vs the vocabulary (z {down['trigger_logit_z']:.2f})") in text
