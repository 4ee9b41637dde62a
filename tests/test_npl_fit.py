"""NPL fits: the streamed exact fit is least squares, Adagrad is torch's Adagrad, metrics and the
model's loss are what a direct computation gives."""
import numpy as np
import pytest
import torch

from ffnscope.engine.model.load import load_model
from ffnscope.engine.npl.capture import GCapture, make_runner, run_layers, token_nll
from ffnscope.engine.npl.fit import AdagradMap, ExactFit, FitOptions, Metrics, fit_maps
from tests.tiny_models import CONFIGS, build, save


def _lstsq(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    sol = np.linalg.lstsq(design, y, rcond=None)[0]
    return sol[:-1], sol[-1]


@pytest.mark.parametrize("stats_dtype, tol", [("float64", 1e-9), ("float32", 1e-3)])
def test_exact_fit_equals_numpy_lstsq(stats_dtype, tol):
    rng = np.random.default_rng(0)
    d, n = 12, 900
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, d) + rng.normal(size=d) * 50  # large means: centering matters
    x[:, 3] = 0.7 * x[:, 1] - 0.2 * x[:, 5] + 0.01 * rng.normal(size=n)              # ill-conditioned column
    y = x @ rng.normal(size=(d, d)) + 3.0 + rng.normal(size=(n, d))
    fit = ExactFit([(0, 1)], d, torch.device("cpu"), stats_dtype, block=5)  # blocks of X^T X that do not divide d
    for lo in range(0, n, 128):
        gx, gy = (torch.as_tensor(a[lo:lo + 128], dtype=torch.float64) for a in (x, y))
        fit.begin_batch(len(gx))
        fit.layer(0, gx)
        fit.layer(1, gy)
        fit.cross(0, 1, gx, gy)
    w, b = fit.solve(ridge=0.0)[(0, 1)]
    w_ref, b_ref = _lstsq(x, y)
    pred, pred_ref = x @ w + b, x @ w_ref + b_ref
    assert np.abs(pred - pred_ref).max() < tol * np.abs(pred_ref).max()
    if stats_dtype == "float64":
        np.testing.assert_allclose(w, w_ref, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(b, b_ref, rtol=1e-7, atol=1e-6)


def test_ridge_is_the_penalized_solution_and_singular_inputs_are_handled():
    rng = np.random.default_rng(1)
    d, n = 6, 200
    x = rng.normal(size=(n, d))
    x[:, 2] = 0.0                                   # a dead neuron: X^T X is singular
    y = rng.normal(size=(n, 4 + 2))
    fit = ExactFit([(0, 1)], d, torch.device("cpu"), "float64")
    fit.begin_batch(n)
    gx, gy = torch.as_tensor(x), torch.as_tensor(y)
    fit.layer(0, gx), fit.layer(1, gy), fit.cross(0, 1, gx, gy)
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = 0.1 * np.trace(xc.T @ xc) / d
    w_ref = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T @ yc)
    w, b = fit.solve(ridge=0.1)[(0, 1)]
    np.testing.assert_allclose(w, w_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ w_ref, rtol=1e-9, atol=1e-12)
    w0, b0 = fit.solve(ridge=0.0)[(0, 1)]           # no ridge: the minimum-norm least-squares solution
    w_ref0, b_ref0 = _lstsq(x, y)
    np.testing.assert_allclose(x @ w0 + b0, x @ w_ref0 + b_ref0, atol=1e-9)
    assert np.abs(w0[2]).max() < 1e-9


def test_adagrad_is_torch_adagrad_on_mse():
    rng = np.random.default_rng(2)
    x, y = torch.as_tensor(rng.normal(size=(50, 7)), dtype=torch.float32), torch.as_tensor(rng.normal(size=(50, 5)),
                                                                                           dtype=torch.float32)
    ours = AdagradMap(7, 5, torch.device("cpu"), lr=0.01)
    lin = torch.nn.Linear(7, 5)
    with torch.no_grad():
        lin.weight.zero_(), lin.bias.zero_()
    opt = torch.optim.Adagrad(lin.parameters(), lr=0.01)
    for step in range(4):
        xb, yb = x[10 * step:10 * step + 20], y[10 * step:10 * step + 20]
        ours.step(xb, yb)
        opt.zero_grad()
        torch.nn.functional.mse_loss(lin(xb), yb).backward()
        opt.step()
    torch.testing.assert_close(ours.W, lin.weight.detach().T, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.b, lin.bias.detach(), rtol=1e-5, atol=1e-7)
    assert ours.W.abs().max() > 0.01  # it moved


def test_metrics_equal_direct_computation():
    rng = np.random.default_rng(3)
    actual = rng.normal(size=(300, 8)) * 2 + 5
    pred = actual + rng.normal(size=(300, 8)) * 0.5
    pred[:, 7] = 1.0                                 # a constant prediction: Pearson r undefined
    m = Metrics(8, torch.full((8,), 4.0, dtype=torch.float64))
    for lo in range(0, 300, 70):
        m.update(torch.as_tensor(pred[lo:lo + 70]), torch.as_tensor(actual[lo:lo + 70]))
    values, scalars = m.result()
    r = [np.corrcoef(pred[:, i], actual[:, i])[0, 1] for i in range(7)]
    np.testing.assert_allclose(values["pearson"][:7], r, rtol=1e-9)
    assert np.isnan(values["pearson"][7])
    np.testing.assert_allclose(values["l2"], np.sqrt(((pred - actual) ** 2).mean(0)), rtol=1e-9)
    np.testing.assert_allclose(values["target_mean"], actual.mean(0), rtol=1e-9)
    np.testing.assert_allclose(values["target_var"], actual.var(0), rtol=1e-9)
    assert scalars["token_l2"] == pytest.approx(np.linalg.norm(pred - actual, axis=1).mean(), rel=1e-9)
    assert scalars["mse"] == pytest.approx(((pred - actual) ** 2).mean(), rel=1e-9)
    unexplained = ((pred - actual) ** 2).sum() / ((actual - actual.mean(0)) ** 2).sum()
    assert scalars["fvu"] == pytest.approx(unexplained, rel=1e-9)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_model(str(save(build("llama", 4), tmp_path_factory.mktemp("npl-fit") / "m")))


def _all_g(lm, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """g of every layer, read by hooks on an ordinary whole-model forward."""
    grabbed: dict[int, list] = {}
    handles = [lm.adapter.down_module(layer).register_forward_pre_hook(
        lambda _m, args, k=k: grabbed.setdefault(k, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for k, layer in enumerate(lm.adapter.layers)]
    with torch.no_grad():
        lm.model(input_ids=torch.as_tensor(tokens.astype(np.int64)))
    for h in handles:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in grabbed.items()}


def test_fit_maps_on_a_model_equals_lstsq_and_direct_metrics(tiny_llama):
    lm = tiny_llama
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 256, size=(30, 24)).astype(np.int32)
    fit_tokens, held = tokens[:24], tokens[24:]
    pairs = [(0, 1), (2, 1), (1, 1), (0, 3)]
    result = fit_maps(lm, fit_tokens, held, pairs, FitOptions(ridge=0.0, stats_dtype="float64", batch_tokens=24 * 5))
    g_fit, g_held = _all_g(lm, fit_tokens), _all_g(lm, held)
    for i, j in pairs:
        rec = result.maps["exact"][(i, j)]
        w_ref, b_ref = _lstsq(g_fit[i], g_fit[j])
        pred_ref = g_fit[i] @ w_ref + b_ref
        assert np.abs(g_fit[i] @ rec.W + rec.b - pred_ref).max() < 1e-5 * np.abs(pred_ref).max()
        pred = g_held[i] @ rec.W + rec.b
        err = pred - g_held[j]
        np.testing.assert_allclose(rec.metrics["l2"], np.sqrt((err ** 2).mean(0)), rtol=1e-4, atol=1e-9)
        r = [np.corrcoef(pred[:, n], g_held[j][:, n])[0, 1] for n in range(pred.shape[1])]
        np.testing.assert_allclose(rec.metrics["pearson"], r, rtol=1e-4, atol=1e-6)
        assert rec.scalars["token_l2"] == pytest.approx(np.linalg.norm(err, axis=1).mean(), rel=1e-4)
    assert result.maps["exact"][(1, 1)].scalars["fvu"] < 1e-8       # a self map is the identity
    assert result.maps["exact"][(0, 1)].scalars["fvu"] > 1e-3
    with torch.no_grad():
        logits = lm.model(input_ids=torch.as_tensor(held.astype(np.int64))).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            torch.as_tensor(held[:, 1:].astype(np.int64)).reshape(-1), reduction="none")
    np.testing.assert_allclose(result.heldout_nll.reshape(-1), ref.numpy(), rtol=1e-5, atol=1e-5)
    assert result.fit_tokens == fit_tokens.size and result.heldout_tokens == held.size


def test_adagrad_recipe_runs_in_the_same_pass_and_is_worse_than_exact(tiny_llama):
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 256, size=(40, 32)).astype(np.int32)
    result = fit_maps(tiny_llama, tokens[:34], tokens[34:], [(1, 2)], FitOptions(method="both", adagrad_tokens=320))
    assert result.options["batch_tokens_used"] == 320                  # 10 sequences a step
    exact, ada = result.maps["exact"][(1, 2)], result.maps["adagrad"][(1, 2)]
    assert exact.scalars["token_l2"] < ada.scalars["token_l2"]
    assert {"forward", "exact", "adagrad", "heldout"} <= set(result.seconds)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_layer_by_layer_loss_equals_the_models_own(family):
    """The runner + final norm + LM head path gives the model's own logits, for every family."""
    model = build(family, 2, seed=1)
    from ffnscope.engine.model.load import LoadedModel
    from ffnscope.engine.model.sites import Adapter

    lm = LoadedModel(model, None, Adapter(model), family, family, "x")
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    runner = make_runner(lm, torch.device("cpu"), 64)
    hooks = GCapture(lm.adapter, [0, 1])
    with torch.inference_mode(), hooks.attached():
        hidden = run_layers(runner, runner.embed(ids), 0, 2)
        ours = token_nll(lm.adapter, hidden, ids, chunk_tokens=7)
        logits = model(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            ids[:, 1:].reshape(-1), reduction="none").reshape(3, 15)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert set(hooks.g) == {0, 1}
