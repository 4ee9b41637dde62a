"""Dead on smooth activations, and the relative firing rule.

- The paper's dead (never activated: act > 0 nowhere, tau 0) is reported beside the stricter dead of
  the firing rule (never above tau = 1), in the tables, exports and views: a gated neuron that is
  weakly active everywhere but never above 1 is dead at tau 1 and alive for the paper.
- A relative rule (--tau-rule) gives each layer its own threshold from the calibration sample, stores
  it, and records with it: two layers whose activations differ by a factor of 10 fire alike under it.

Planted in tiny Llamas (tests.tiny_models.build('llama')): every embedding entry is +1 or -1 (the RMS
norm divides by exactly 1) and layer 0's attention writes nothing, so the FFN reads the embedding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ffnscope.cache.reader import CacheReader
from ffnscope.cache.store import read_state
from ffnscope.engine.explore.tables import layer_table, neuron_table
from ffnscope.engine.analysis.job import analyze
from tests.conftest import env_for_subprocess
from tests.helpers import record_tiny
from tests.reference import reference_stats
from tests.tiny_models import build, save

ONE_DIM = 0                   # +1 on every token
WEAK, NEVER = 3, 4            # silu(0.5) = 0.31 on every token; silu(-2) = -0.24 on every token


def _plain_inputs(model, seed: int = 1):
    """±1 embeddings, no attention output: each layer's FFN input is the token's embedding."""
    emb = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    emb.copy_(torch.where(torch.rand(emb.shape, generator=gen) < 0.5, -1.0, 1.0))
    emb[:, ONE_DIM] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.post_attention_layernorm.weight.fill_(1.0)
    return gen


@torch.no_grad()
def weak_llama():
    model = build("llama", n_layers=2)
    _plain_inputs(model)
    mlp = model.model.layers[0].mlp
    for neuron, gate in ((WEAK, 0.5), (NEVER, -2.0)):
        mlp.gate_proj.weight[neuron].zero_()
        mlp.gate_proj.weight[neuron, ONE_DIM] = gate
        mlp.up_proj.weight[neuron].zero_()
        mlp.up_proj.weight[neuron, ONE_DIM] = 1.0     # g = silu(gate): 0.31 for WEAK
    return model


@pytest.fixture(scope="module")
def weak(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("weak")
    model_dir = save(weak_llama(), tmp / "model")
    cache = tmp / "c.h5"
    record_tiny(cache, model_dir, [text_file], tokens=1024)   # SiLU: default tau 1
    analyze(cache, log=lambda _m: None)
    return cache


def test_weakly_active_neuron_is_dead_at_tau_1_but_not_for_the_paper(weak):
    with CacheReader(weak) as reader:
        assert reader.meta["recording"]["primary_tau"] == 1.0
        rows = {r["neuron"]: r for r in neuron_table(reader, [0]).rows()}
        layers = {r["layer"]: r for r in layer_table(reader).rows()}
        sumsq = reader.array(0, "g_sumsq")
        primary = reader.primary_fire_count(0)
    assert rows[WEAK]["tau"] == 1.0
    assert rows[WEAK]["dead"] is True and rows[WEAK]["dead_tau0"] is False   # active everywhere, never > 1
    assert rows[NEVER]["dead"] is True and rows[NEVER]["dead_tau0"] is True  # never activated at all
    first = layers[0]
    assert first["tau"] == 1.0
    assert first["dead_tau0_frac"] < first["dead_frac"]
    dead = primary == 0
    assert dead[WEAK] and first["dead_sq_frac"] == pytest.approx(sumsq[dead].sum() / sumsq.sum())
    assert first["dead_sq_frac"] > 0                               # what the "dead" carry, said aloud


def test_dead_analysis_stores_both(weak):
    from ffnscope.cache import analysis_store as store

    with CacheReader(weak) as reader:
        dead = store.read_group(reader, "dead")
        d = reader.meta["model"]["d_ffn"]
        never = [(reader.array(layer, "fire_count", 0) == 0).mean() for layer in reader.layers]  # row 0: tau 0
    assert reader.meta["recording"]["taus"][0] == 0.0
    np.testing.assert_allclose(dead["dead_tau0"], never)
    assert dead["dead_primary"][0] >= dead["dead_tau0"][0] + 1 / d   # WEAK at least
    np.testing.assert_array_equal(dead["tau"], [1.0, 1.0])


def test_views_and_exports_name_the_threshold(weak, tmp_path):
    import subprocess
    import sys

    from rich.console import Console

    from ffnscope.app.info_view import layer_table as info_table

    with CacheReader(weak) as reader:
        console = Console(width=250, record=True)
        console.print(info_table(reader))
    text = console.export_text()
    assert "dead % τ=1" in text and "dead % τ=0 (paper)" in text and "never activated" in text
    assert "never above τ=1" in text

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], env=env_for_subprocess(),
                              capture_output=True, text=True)

    out = tmp_path / "never.csv"
    assert cli("export", weak, "--dead", "tau0", "--layers", "0", "--out", out).returncode == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    assert {"dead", "dead_tau0", "tau"} <= set(rows[0])
    neurons = {int(r["neuron"]) for r in rows}
    assert NEVER in neurons and WEAK not in neurons
    out = tmp_path / "dead.csv"
    assert cli("export", weak, "--dead", "--layers", "0", "--out", out).returncode == 0
    assert {WEAK, NEVER} <= {int(r["neuron"]) for r in csv.DictReader(out.open())}
    report = cli("report", weak)
    assert report.returncode == 0, report.stderr
    assert "never activated, τ=0: the paper's dead" in report.stdout        # its own chart
    assert "dead neurons (Fig. 1a) at each recording's firing rule" in report.stdout


# --- the relative rule ---------------------------------------------------------------------------------
SCALE = 10.0


@torch.no_grad()
def scaled_llama():
    """Layer 1's gate is exactly 10 x layer 0's on every token: layer 0's FFN writes nothing, so layer 1's
    FFN reads the same embedding."""
    model = build("llama", n_layers=2)
    gen = _plain_inputs(model)
    first, second = model.model.layers
    d_ffn, d = first.mlp.gate_proj.weight.shape
    gate = torch.randn(d_ffn, d, generator=gen) * 1.5 / d ** 0.5
    first.mlp.gate_proj.weight.copy_(gate)
    second.mlp.gate_proj.weight.copy_(SCALE * gate)
    second.mlp.up_proj.weight.copy_(first.mlp.up_proj.weight)
    first.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def scaled_dir(tmp_path_factory):
    return save(scaled_llama(), tmp_path_factory.mktemp("scaled") / "model")


def _fractions(state) -> list[float]:
    primary = state.meta["recording"]["primary_index"]
    return [state.layers[i].fire_count[primary].sum() / (state.n_tokens * state.meta["model"]["d_ffn"])
            for i in sorted(state.layers)]


@pytest.mark.parametrize("rule", ["quantile:0.9", "median-max:0.5"])
def test_relative_rule_stores_and_applies_per_layer_taus(rule, scaled_dir, text_file, tmp_path):
    state = record_tiny(tmp_path / "c.h5", scaled_dir, [text_file], tokens=1024, tau_rule=rule)
    rec = state.meta["recording"]
    assert rec["tau_rule"] == rule and rec["primary_tau"] is None
    assert rec["primary_index"] == len(rec["taus"]) and "tau_l" in rec["firing_rule"]
    taus = {int(k): v for k, v in rec["layer_taus"].items()}
    assert 5 < taus[1] / taus[0] < 20                      # the layers' scales differ by 10
    fractions = _fractions(state)
    assert abs(fractions[0] - fractions[1]) < 0.3 * max(fractions)
    if rule.startswith("quantile"):
        assert all(0.05 < f < 0.15 for f in fractions)      # about 1 - 0.9 in each layer
    # applied: each layer's last fire_count row counts act > its own tau_l, as a plain forward does
    model = scaled_llama()
    tokens = state.data.tokens
    for layer in (0, 1):
        layer_taus = [*rec["taus"], taus[layer]]
        parts = [reference_stats(model, tokens[i:i + 2], layer_taus, len(layer_taus) - 1)
                 for i in range(0, len(tokens), 2)]
        np.testing.assert_array_equal(state.layers[layer].fire_count, sum(p[layer]["fire_count"] for p in parts))
    # stored in the cache and shown with the figures
    assert read_state(tmp_path / "c.h5", "testing").meta["recording"]["layer_taus"] == rec["layer_taus"]
    analyze(tmp_path / "c.h5", only=["dead"], log=lambda _m: None)
    from rich.console import Console

    from ffnscope.app.info_view import layer_table as info_table

    with CacheReader(tmp_path / "c.h5") as reader:
        console = Console(width=250, record=True)
        console.print(info_table(reader))
    text = console.export_text()
    assert "τ_l" in text and f"{taus[1]:.4g}" in text and "dead % τ=0 (paper)" in text


def test_absolute_tau_fires_unalike_on_the_same_layers(scaled_dir, text_file, tmp_path):
    """The premise: at one absolute tau the 10x layer fires much more often."""
    state = record_tiny(tmp_path / "c.h5", scaled_dir, [text_file], tokens=1024)
    fractions = _fractions(state)
    assert state.meta["recording"]["tau_rule"] == "absolute"
    assert fractions[1] > 2 * fractions[0]


def test_tau_rule_is_checked(scaled_dir, text_file, tmp_path):
    from ffnscope.cache.errors import UserError

    with pytest.raises(UserError, match="--tau-rule"):
        record_tiny(tmp_path / "a.h5", scaled_dir, [text_file], tau_rule="quantile:2")
    with pytest.raises(UserError, match="--tau"):
        record_tiny(tmp_path / "b.h5", scaled_dir, [text_file], tau_rule="quantile:0.9", tau=0.5)
