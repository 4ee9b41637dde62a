"""NPL jobs on a recorded cache: the sidecar, its ties to the cache and the model, held-out text
checks, stopping, functional neurons and the neuron-table columns."""
import json
import shutil

import numpy as np
import pytest
import torch

from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import NplReader, sequence_hashes, sidecar_path
from ffnscope.engine.npl.columns import neuron_columns
from ffnscope.engine.npl.functional import FunctionalParams, _Moments, build_properties
from ffnscope.engine.npl.job import (
    NplFitConfig,
    NplFunctionalConfig,
    NplSubstituteConfig,
    fit_job,
    functional_job,
    substitute_job,
)
from ffnscope.engine.jobs.progress import read_progress
from ffnscope.engine.jobs.stop import Stopped, StopToken
from tests.helpers import record_tiny
from tests.tiny_models import tiny_model_dir

QUIET = dict(log=lambda _m: None)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("npl-jobs")
    model = tiny_model_dir(tmp / "model", "llama")
    cache = tmp / "c.h5"
    record_tiny(cache, model, [text_file])
    report = fit_job(NplFitConfig(cache, pairs="adjacent,1:1,3:0", tokens=3200, device="cpu"), **QUIET)
    return cache, model, report


def test_fit_job_writes_a_sidecar_tied_to_the_cache(fitted):
    cache, _model, report = fitted
    assert report.path == sidecar_path(cache) and report.path.exists()
    with NplReader(report.path) as reader:
        meta = reader.meta
        from ffnscope.cache.reader import CacheReader

        with CacheReader(cache) as c:
            reader.check_cache(c.meta, cache)
            assert meta["cache"]["model_fingerprint"] == c.meta["model"]["fingerprint"]
        assert reader.pairs() == [(0, 1), (1, 1), (1, 2), (2, 3), (3, 0)]
        fit, held = reader.fit_hashes(), reader.heldout_hashes()
        assert len(fit) == 3200 // 32 and len(held) == 16
        np.testing.assert_array_equal(sequence_hashes(reader.heldout_tokens()), held)
        assert reader.heldout_nll().shape == (len(held), 31)
        w, b = reader.load_map(1, 2)
        assert w.shape == (64, 64) and w.dtype == np.float32 and np.isfinite(w).all()
        assert set(reader.metrics(1, 2)) == {"pearson", "l2", "target_mean", "target_var"}
    l2 = report.summary["exact"]["token_l2"]
    assert l2["self"] < 1e-5 < l2["shallow_to_deep"] and l2["deep_to_shallow"] is not None
    assert any("L2 distance per token" in line for line in report.lines)
    assert read_progress(report.path)["status"] == "complete"
    with pytest.raises(UserError, match="--force"):
        fit_job(NplFitConfig(cache, device="cpu"), **QUIET)


def _recorded(cache) -> np.ndarray:
    from ffnscope.cache.reader import CacheReader

    with CacheReader(cache) as reader:
        return reader.tokens()


def test_the_fit_evaluates_on_sequences_neither_the_recording_nor_the_fit_used(fitted, text_file):
    from ffnscope.engine.data.packing import pack, special_ids
    from ffnscope.engine.data.sources import open_sources
    from ffnscope.engine.model.load import load_model

    cache, model, report = fitted
    recorded = sequence_hashes(_recorded(cache))
    with NplReader(report.path) as reader:
        fit, held, tokens = reader.fit_hashes(), reader.heldout_hashes(), reader.heldout_tokens()
        info = reader.meta["fit"]["heldout"]
    assert len(recorded) == 24 and len(fit) == 100 and len(held) == 16
    assert not np.isin(held, recorded).any() and not np.isin(held, fit).any()
    # the recording's 24 sequences begin the same packing; the fit takes its first 100, held out the next 16
    lm = load_model(str(model))
    packed = pack(open_sources([str(text_file)]).documents(), lm.tokenizer, 32, 116, *special_ids(lm.tokenizer))
    np.testing.assert_array_equal(sequence_hashes(packed.tokens[:24]), recorded)
    np.testing.assert_array_equal(tokens, packed.tokens[100:])
    source = f"{text_file} past the first 100 sequences of its packing (the recording's 24, the fit's 100)"
    assert info == {"seqs": 16, "tokens": 512, "seq_len": 32, "source": source, "dropped": 0}
    assert f"held-out: 16 sequences, 512 tokens, from {source}" in report.lines


def _stream(n_seqs: int, seq_len: int = 8, recorded: int = 10):
    """Distinct made-up packed sequences and a recording of the first `recorded` of them."""
    from ffnscope.engine.npl.inputs import Recording

    tokens = np.random.default_rng(0).integers(2, 1000, size=(n_seqs, seq_len)).astype(np.int32)
    tokens[:, 0] = 1
    meta = {"data": {"n_seqs_total": recorded, "seq_len": seq_len, "field": "text", "seed": 0,
                     "sources": [{"kind": "text", "path": "t.txt"}]}, "tokenizer": {"start_id": 1}}
    return tokens, Recording(meta, sequence_hashes(tokens[:recorded]))


def test_heldout_sequences_repeating_recorded_or_fit_text_are_dropped():
    from ffnscope.engine.npl.inputs import plan_fit_data, split_fit_data
    from ffnscope.engine.npl.report import heldout_line

    tokens, rec = _stream(30)
    described = [{"kind": "text", "path": "t.txt", "size": 1}]
    plan = plan_fit_data(rec, described, "text", 0, 8, n_fit=20, n_held=5, heldout_data=False)
    assert (plan.recorded, plan.start, plan.n_pack) == (10, 20, 30)
    fit, held, info = split_fit_data(tokens, plan, rec, ["t.txt"], 5, print)
    np.testing.assert_array_equal(fit, tokens[:20])
    np.testing.assert_array_equal(held, tokens[20:25])              # none repeats: the next five
    assert info["dropped"] == 0 and info["seqs"] == 5
    planted = tokens.copy()
    planted[20], planted[22], planted[23] = tokens[3], tokens[15], tokens[21]  # recorded, fit, held-out text again
    _fit, held, info = split_fit_data(planted, plan, rec, ["t.txt"], 5, print)
    np.testing.assert_array_equal(held, planted[[21, 24, 25, 26, 27]])
    assert info["dropped"] == 3 and "3 repeating recorded or fit text skipped" in heldout_line(info)
    # another seq_len: past the recording's 70 stream tokens (7 after each start token), 15 a sequence
    assert plan_fit_data(rec, described, "text", 0, 16, 2, 5, False).start == 5
    assert plan_fit_data(rec, [{"kind": "text", "path": "u.txt"}], "text", 0, 8, 2, 5, False).start == 2  # another
    assert plan_fit_data(rec, described, "text", 1, 8, 2, 5, False).start == 2         # stream
    notes = []
    fit, held, _info = split_fit_data(tokens[:24], plan, rec, ["t.txt"], 5, notes.append)
    assert len(fit) == 19 and len(held) == 5 and "fitting on 19 (--tokens asks 20)" in notes[0]
    with pytest.raises(UserError, match=r"after the recording's 10 and the fit's 10, 4 fresh ones .*--heldout-data"):
        split_fit_data(tokens[:14], plan, rec, ["t.txt"], 5, print)


def test_a_sidecar_whose_heldout_sequences_were_recorded_is_refused(fitted, tmp_path):
    """An older ffnscope held out sequences of the recording: substitution and functional neurons refuse them."""
    import h5py

    cache, _model, _ = fitted
    copy = tmp_path / "c.h5"
    shutil.copyfile(cache, copy)
    shutil.copyfile(sidecar_path(cache), sidecar_path(copy))
    planted = _recorded(cache)[5:8]
    with h5py.File(sidecar_path(copy), "a") as f:  # held out, not fit on: as an older split left them
        f["data/heldout_tokens"][:3] = planted
        fit = f["data/fit_hashes"][:]
        del f["data/fit_hashes"]
        f["data/fit_hashes"] = fit[~np.isin(fit, sequence_hashes(planted))]
    for job, config in ((substitute_job, NplSubstituteConfig(copy, device="cpu")),
                        (functional_job, NplFunctionalConfig(copy, device="cpu"))):
        with pytest.raises(UserError, match=r"3 of its 16 held-out sequences are ones the recording used .*--force"):
            job(config, **QUIET)


def test_substitution_on_heldout_data_from_another_file(fitted, tmp_path):
    import random

    cache = tmp_path / "c.h5"  # a copy: the results go into its own sidecar
    shutil.copyfile(fitted[0], cache)
    shutil.copyfile(sidecar_path(fitted[0]), sidecar_path(cache))
    fresh = tmp_path / "fresh.txt"
    rng = random.Random(1)
    fresh.write_text(" ".join(rng.choice(("a", "river", "cat", "storm", "hills", "bank")) for _ in range(3000)))
    report = substitute_job(NplSubstituteConfig(cache, heldout_data=[str(fresh)], seeds=1, chunks="4",
                                                mappings=("npl",), device="cpu"), **QUIET)
    assert report.heldout == {"seqs": 16, "tokens": 512, "seq_len": 32, "source": f"{fresh} (--heldout-data)",
                              "dropped": 0}
    with NplReader(sidecar_path(cache)) as reader:
        assert reader.result("substitution")["params"]["heldout"] == report.heldout


def test_heldout_text_sharing_sequences_with_the_fit_data_is_refused(fitted, text_file):
    cache, _model, _ = fitted
    with pytest.raises(UserError, match=r"shares \d+ of its 20 sequences with the recording's or the fit's data"):
        substitute_job(NplSubstituteConfig(cache, heldout_data=[str(text_file)], tokens=640, device="cpu"), **QUIET)


def test_substitution_job_reports_table1_and_stores_it(fitted):
    cache, _model, _ = fitted
    report = substitute_job(NplSubstituteConfig(cache, seeds=2, device="cpu", finegrained=True, fine_chunks="4",
                                                fine_metrics=("l2",), explicit=True), **QUIET)
    assert "NPL" in report.table and "Original" in report.table and "Chunk 4" in report.table
    assert "Explicit only" in report.table and all("explicit" in r for r in report.rows)
    assert report.heldout["seqs"] == 16 and "the fit's 100" in report.heldout["source"]   # the fit's held-out ones
    assert {(r["mapping"], r["chunk"]) for r in report.rows} == {(m, c) for m in ("random", "zero", "identical", "npl")
                                                                 for c in (2, 3, 4)}
    with NplReader(sidecar_path(cache)) as reader:
        stored = reader.result("substitution")
        assert stored["rows"] == json.loads(json.dumps(report.rows))
        assert stored["params"]["layer0"].startswith("kept actual")
        from_fit = float(np.exp(reader.heldout_nll().astype(float).mean()))
        assert stored["params"]["original_ppl"] == pytest.approx(from_fit, rel=1e-5)
        fine = reader.result("finegrained")["rows"]
    assert len(fine) == 2 + 8 and all(r["chunk"] == 4 for r in fine)
    actual = [r for r in fine if r["top"] == r["bottom"] == "actual"][0]
    assert actual["complete"] == pytest.approx(report.original_ppl, rel=1e-6)


def test_maps_applied_to_another_model_are_refused(fitted, tmp_path):
    cache, _model, _ = fitted
    other = tiny_model_dir(tmp_path / "other", "llama", seed=1)
    with pytest.raises(UserError, match="is not the model recorded in"):
        substitute_job(NplSubstituteConfig(cache, model=str(other), device="cpu"), **QUIET)
    from ffnscope.engine.model.load import load_model
    from ffnscope.engine.npl.substitute import Maps

    lm = load_model(str(other))
    with NplReader(sidecar_path(cache)) as reader:
        with pytest.raises(UserError, match="were fit on model"):
            reader.check_model(lm.fingerprint, lm.name)
        maps = Maps.from_reader(reader, [1, 2])
        with pytest.raises(UserError, match="fit on another model"):
            maps.check_model(lm)
        from ffnscope.cache.reader import CacheReader

        with CacheReader(cache) as c:
            meta = json.loads(json.dumps(c.meta))
        meta["model"]["fingerprint"] = lm.fingerprint   # the cache of another model beside these maps
        with pytest.raises(UserError, match="another model"):
            reader.check_cache(meta, cache)


def test_a_stopped_fit_writes_nothing(fitted, tmp_path):
    cache, _model, _ = fitted
    copy = tmp_path / "copy.h5"
    shutil.copyfile(cache, copy)
    with pytest.raises(Stopped):
        fit_job(NplFitConfig(copy, tokens=3200, device="cpu"), stop=StopToken(requested=True), **QUIET)
    assert not sidecar_path(copy).exists()
    assert read_progress(sidecar_path(copy))["status"] == "stopped"


def test_functional_job_and_neuron_columns(fitted, tmp_path):
    cache, _model, _ = fitted
    assert neuron_columns(tmp_path / "none.h5") == {}
    before = neuron_columns(cache)
    assert before[2]["background"][0] == -1 and np.isfinite(before[2]["npl_l2"]).all()
    assert np.isfinite(before[0]["npl_l2"]).all()            # from the backward map 3 -> 0
    report = functional_job(NplFunctionalConfig(cache, device="cpu", min_count=3), **QUIET)
    assert {r["layer"] for r in report.rows} == {0, 1, 2, 3}
    cols = neuron_columns(cache)
    with NplReader(sidecar_path(cache)) as reader:
        l2 = reader.metrics(1, 2)["l2"]
        stored = reader.result("functional")
    np.testing.assert_allclose(cols[2]["npl_l2"], l2)
    s_random = stored["arrays"]["s_random"][list(stored["arrays"]["layers"]).index(2)]
    np.testing.assert_array_equal(cols[2]["background"] == 1, l2 < s_random)
    assert 0 < report.background_frac[2] < 1


def test_importance_is_the_papers_variance_reduction():
    rng = np.random.default_rng(0)
    n, T, d = 6, 16, 5
    tokens = rng.integers(0, 4, size=(n, T))
    nll = rng.uniform(0, 5, size=(n, T - 1))
    g = rng.normal(size=(n, T, d))
    g[..., 0] += 3.0 * (tokens == 2)                             # neuron 0 tracks token 2
    params = FunctionalParams(top_ngrams=4, min_count=1, span=4)
    props = build_properties(tokens, nll, vocab=4, first_pos=0, params=params)
    moments = _Moments(props, d, torch.device("cpu"))
    moments.update(torch.as_tensor(g[:4]), slice(0, 4))
    moments.update(torch.as_tensor(g[4:]), slice(4, 6))
    mu = moments.importance()

    def direct(mask, universe):
        x, m = g[universe], mask[universe]
        beta = m.mean()
        return 1 - ((1 - beta) * x[m].var(0) + beta * x[~m].var(0)) / x.var(0)

    everywhere = np.ones((n, T), bool)
    defined = everywhere.copy()
    defined[:, -1] = False
    names = props.names
    np.testing.assert_allclose(mu[names.index(("unigram", "2"))], direct(tokens == 2, everywhere), rtol=1e-9)
    loss = np.concatenate([nll, np.full((n, 1), np.nan)], axis=1)
    hard = names.index([x for x in names if x[0] == "hard"][0])
    threshold = np.quantile(nll, 0.9)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(mu[hard], direct(loss >= threshold, defined), rtol=1e-9)
    span = names.index(("pos_successive", "4-7"))
    pos = np.broadcast_to(np.arange(T), (n, T))
    np.testing.assert_allclose(mu[span], direct((pos >= 4) & (pos < 8), everywhere), rtol=1e-9)
    assert mu[names.index(("unigram", "2")), 0] > 0.5 > mu[names.index(("unigram", "2")), 1]


def test_reading_npl_results_does_not_import_torch():
    import subprocess
    import sys

    from tests.conftest import env_for_subprocess

    probe = ("import sys, engine.npl.job, engine.npl.columns, engine.npl.layout, cache.npl_store\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env_for_subprocess(),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NO-TORCH"
