"""A layer planted as an exact linear function of the previous layer: the NPL map recovers it, and
substituting it with that map leaves the perplexity unchanged while zeroing it does not."""
import numpy as np
import pytest
import torch

from ffnscope.engine.model.load import load_model
from ffnscope.engine.npl.fit import FitOptions, fit_maps
from ffnscope.engine.npl.substitute import Maps, Setting, mapping_fn, run_settings
from tests.tiny_models import NPL_PLANTED_LAYER, planted_linear_llama, save

J = NPL_PLANTED_LAYER


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, w = planted_linear_llama()
    lm = load_model(str(save(model, tmp_path_factory.mktemp("npl-planted") / "m")))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(72, 32)).astype(np.int32)
    result = fit_maps(lm, tokens[:60], tokens[60:], [(j - 1, j) for j in range(1, 4)], FitOptions())
    return lm, w, tokens[60:], result


def test_the_plant_holds_exactly_in_the_model(planted):
    lm, w, held, _ = planted
    grabbed = {}
    handles = [lm.adapter.down_module(lm.adapter.layers[k]).register_forward_pre_hook(
        lambda _m, args, k=k: grabbed.__setitem__(k, args[0].reshape(-1, args[0].shape[-1]).double().numpy()))
        for k in (J - 1, J)]
    with torch.no_grad():
        lm.model(input_ids=torch.as_tensor(held.astype(np.int64)))
    for h in handles:
        h.remove()
    scale = np.abs(grabbed[J]).max()
    assert np.abs(grabbed[J - 1] @ w - grabbed[J]).max() < 1e-5 * scale
    assert np.abs(grabbed[J - 1] - grabbed[J]).max() > 0.1 * scale  # not the identity


def test_npl_map_recovers_the_planted_map(planted):
    _, w, _, result = planted
    rec = result.maps["exact"][(J - 1, J)]
    assert np.abs(rec.W - w).max() < 1e-3 * np.abs(w).max()
    assert np.abs(rec.b).max() < 1e-3
    assert rec.scalars["fvu"] < 1e-8                       # held-out error near 0 ...
    assert rec.scalars["token_l2"] < 1e-4 * np.sqrt(rec.metrics["target_var"].sum())
    assert np.nanmin(rec.metrics["pearson"]) > 0.999999
    for other in ((J - 2, J - 1), (J, J + 1)):              # ... where the other layers are not linear
        assert result.maps["exact"][other].scalars["fvu"] > 0.05


def test_npl_substitution_of_the_planted_layer_keeps_perplexity(planted):
    lm, _, held, result = planted
    maps = Maps(lm.fingerprint, lm.adapter.d_ffn, {j: (r.W, r.b) for (i, j), r in result.maps["exact"].items()})
    settings = [Setting([J], mapping_fn(kind, maps), {"mapping": kind}) for kind in ("npl", "zero", "identical")]
    settings.append(Setting([J + 1], mapping_fn("npl", maps), {"mapping": "npl-next"}))
    run = run_settings(lm, held, settings, batch_tokens=128)
    base = run.original_ppl
    assert base == pytest.approx(float(np.exp(result.heldout_nll.astype(np.float64).mean())), rel=1e-6)
    npl, zero, identical, npl_next = run.outcomes
    for mode in ("complete", "partial"):
        assert abs(npl.ppl(mode) / base - 1) < 1e-4
    assert abs(zero.ppl("complete") / base - 1) > 3e-3
    assert abs(identical.ppl("complete") / base - 1) > 3e-3
    assert abs(npl_next.ppl("complete") / base - 1) > 1e-4   # a layer that is not planted changes it
