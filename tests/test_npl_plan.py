"""NPL at scale and its progress: the memory plan puts the pairs in groups (one pass each) with the
results of one pass, refuses what cannot fit before reading data; the jobs report their real phase
and a monotone percent through the progress file."""
import functools
import json

import numpy as np
import pytest

import ffnscope.engine.jobs.progress as progress_module
import ffnscope.engine.npl.job as job_module
from ffnscope.cache.errors import UserError
from ffnscope.engine.model.load import load_model
from ffnscope.engine.npl.fit import FitOptions, fit_maps
from ffnscope.engine.npl.plan import MEMORY_ENV, group_bytes, plan_groups
from ffnscope.engine.npl.job import NplFitConfig, NplFunctionalConfig, NplSubstituteConfig, fit_job, \
    functional_job, substitute_job
from tests.helpers import record_tiny
from tests.tiny_models import build, save, tiny_model_dir

QUIET = dict(log=lambda _m: None)
GB = 10 ** 9


def test_plan_groups_sizes_and_refusals_at_scale():
    d, pairs = 36_864, [(k, k + 1) for k in range(31)]           # a 70B-class FFN, adjacent pairs
    one = group_bytes([(0, 1)], d, ["exact"], "float64", 8192)
    assert 16 * d * d + 24 * d * d < one < 16 * d * d + 24 * d * d + 8 * GB  # X^T X, X^T Y, the solve
    groups = plan_groups(pairs, d, ["exact"], "float64", 8192, 130 * GB, "the GPU", results_on_device=False)
    assert [p for g in groups for p in g] == pairs and 1 < len(groups) < len(pairs)
    assert all(group_bytes(g, d, ["exact"], "float64", 8192) <= 130 * GB for g in groups)
    assert len(plan_groups(pairs, d, ["exact"], "float64", 8192, 10 ** 15, "x", False)) == 1
    # a pair's sources share X^T X: two pairs from one source cost less than two from two sources
    assert group_bytes([(0, 1), (0, 2)], d, ["exact"], "float64", 8192) < \
        group_bytes([(0, 1), (2, 3)], d, ["exact"], "float64", 8192)
    with pytest.raises(UserError, match=r"needs \d+\.\d GiB for one layer pair.*--method adagrad") as err:
        plan_groups(pairs, d, ["exact"], "float64", 8192, 40 * GB, "the GPU", results_on_device=False)
    assert "\n" not in str(err.value) and "fewer --pairs" not in str(err.value)
    with pytest.raises(UserError) as err:                          # nothing helps but a bigger device
        plan_groups(pairs, d, ["adagrad"], "float64", 8192, 5 * GB, "the GPU", results_on_device=False)
    assert "use a device with more memory" in str(err.value)
    # on a CPU the maps already fit are held in the same memory: fewer pairs helps
    with pytest.raises(UserError, match="fewer --pairs"):
        plan_groups(pairs, d, ["exact"], "float64", 8192, one + 8 * d * d * 5, "the host", results_on_device=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_model(str(save(build("llama", 4), tmp_path_factory.mktemp("npl-plan") / "m")))


@pytest.mark.parametrize("method", ["exact", "both"])
def test_grouped_fit_equals_one_pass_exactly(tiny_llama, method, monkeypatch):
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 256, size=(30, 24)).astype(np.int32)
    pairs = [(0, 1), (0, 2), (1, 1), (2, 3), (3, 0)]
    options = dict(method=method, stats_dtype="float64", batch_tokens=24 * 5, adagrad_tokens=24 * 4)
    whole = fit_maps(tiny_llama, tokens[:24], tokens[24:], pairs, FitOptions(**options))
    d, batch = tiny_llama.adapter.d_ffn, whole.options["batch_tokens_used"]
    methods = whole.options["methods"]
    held = 8 * d * d * len(methods) * len(pairs)                 # the float64 maps kept on the host
    budget = held + max(group_bytes([p], d, methods, "float64", batch) for p in pairs)
    monkeypatch.setenv(MEMORY_ENV, str(budget))                    # a small budget: one pair per pass
    grouped = fit_maps(tiny_llama, tokens[:24], tokens[24:], pairs, FitOptions(**options))
    assert whole.options["pair_groups"] == 1 and grouped.options["pair_groups"] == len(pairs)
    np.testing.assert_array_equal(grouped.heldout_nll, whole.heldout_nll)
    for m in methods:
        assert list(grouped.maps[m]) == list(whole.maps[m]) == pairs
        for p, rec in whole.maps[m].items():
            other = grouped.maps[m][p]
            np.testing.assert_array_equal(other.W, rec.W)
            np.testing.assert_array_equal(other.b, rec.b)
            assert other.scalars == rec.scalars
            for key, values in rec.metrics.items():
                np.testing.assert_array_equal(other.metrics[key], values)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("npl-plan-jobs")
    path = tmp / "c.h5"
    record_tiny(path, tiny_model_dir(tmp / "model", "llama"), [text_file])
    return path


def test_an_impossible_budget_is_refused_before_any_data_is_read(cache, monkeypatch):
    def no_packing(*_a, **_k):
        raise AssertionError("data read")

    monkeypatch.setattr(job_module, "pack_text", no_packing)
    with pytest.raises(UserError, match=r"the NPL fit needs .* for one layer pair .* NPL memory budget is 1000 B"):
        fit_job(NplFitConfig(cache, tokens=3200, device="cpu", memory=1000), **QUIET)
    monkeypatch.setenv(MEMORY_ENV, "2KiB")
    with pytest.raises(UserError, match=r"budget is 2.0 KiB; use .*a device with more memory"):
        fit_job(NplFitConfig(cache, tokens=3200, device="cpu"), **QUIET)
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(UserError, match=MEMORY_ENV):
        fit_job(NplFitConfig(cache, tokens=3200, device="cpu"), **QUIET)


def _writes(monkeypatch) -> list[dict]:
    """Every state the jobs write to their progress file (written each update: no half-second wait)."""
    seen: list[dict] = []
    write = progress_module.write_text

    def recording(path, text):
        seen.append(json.loads(text))
        return write(path, text)

    monkeypatch.setattr(progress_module, "write_text", recording)
    monkeypatch.setattr(job_module, "ProgressFile", functools.partial(progress_module.ProgressFile, interval=0.0))
    return seen


def _phases(seen: list[dict]) -> list[str]:
    return [s["phase"] for n, s in enumerate(seen) if n == 0 or s["phase"] != seen[n - 1]["phase"]]


def _fractions(seen: list[dict], phases) -> list[float]:
    return [s["tokens_done"] / s["tokens_total"] for s in seen if s["phase"] in phases and s.get("tokens_total")]


def _monotone(values: list[float]) -> bool:
    return all(a <= b for a, b in zip(values, values[1:]))


def test_fit_and_substitute_report_phases_and_a_monotone_percent(cache, monkeypatch):
    seen = _writes(monkeypatch)
    monkeypatch.setenv(MEMORY_ENV, "1.5MB")                       # the 5 pairs in several passes on this tiny model
    report = fit_job(NplFitConfig(cache, pairs="adjacent,1:1,3:0", tokens=3200, device="cpu", batch_tokens=512,
                                  force=True), **QUIET)
    n = report.result.options["pair_groups"]
    assert 1 < n < 5
    phases = _phases(seen)
    assert phases[:4] == ["starting", "loading model", "packing data", "placing model"]
    assert phases[4:] == ["fitting", "solving", "scoring held-out"] * n + ["writing", "done"]
    packing = _fractions(seen, {"packing data"})
    assert packing and _monotone(packing) and packing[-1] == 1.0
    passes = _fractions(seen, {"fitting", "solving", "scoring held-out"})
    assert _monotone(passes) and passes[-1] == 1.0
    batches = -(-report.result.fit_tokens // 512)                # group 1 runs layers 0-1 (pairs 0:1, 1:1)
    first = {s["tokens_done"] for s in seen if s["phase"] == "fitting" and s.get("group") == 1}
    assert len(first) >= 2 * batches                               # per layer, not per batch
    assert {s.get("group") for s in seen if s["phase"] == "fitting"} == set(range(1, n + 1))
    assert all(s["eta_s"] is not None and s["tokens_per_s"] > 0 for s in seen
               if s["phase"] == "fitting" and s["tokens_done"])
    assert seen[-1]["status"] == "complete"

    seen.clear()
    substitute_job(NplSubstituteConfig(cache, device="cpu", seeds=1, mappings=("zero", "npl")), **QUIET)
    assert _phases(seen) == ["starting", "loading model", "reading maps",
                             "preparing settings", "placing model", "substituting", "writing", "done"]
    subst = _fractions(seen, {"substituting"})
    assert _monotone(subst) and subst[-1] == 1.0 and len(set(subst)) > 10

    seen.clear()
    functional_job(NplFunctionalConfig(cache, device="cpu", min_count=2), **QUIET)
    assert _phases(seen) == ["starting", "loading model", "counting properties", "placing model",
                             "functional neurons", "summarizing", "writing", "done"]
    func = _fractions(seen, {"functional neurons"})
    assert _monotone(func) and func[-1] == 1.0 and len(set(func)) > 3
