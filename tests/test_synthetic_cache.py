"""bench/synthetic_cache.py: a small synthetic cache is a cache like any other, its stored analyses are
what `analyze` computes from it (and counts as current), and what it says it planted comes back."""
import csv
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from bench.synthetic_cache import HOSTILE, generate
from ffnscope.cache import analysis_store as store
from ffnscope.cache.reader import CacheReader
from ffnscope.cache.store import read_state, write_state
from ffnscope.engine.analysis.neuron_table import layer_table, neuron_table
from ffnscope.engine.analysis.positional import KINDS
from ffnscope.engine.analysis.run import Analyzer
from tests.conftest import env_for_subprocess

SMALL = dict(layers=4, d_ffn=256, seq_len=64, vocab=300, seed=3)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "synth.h5"
    return path, generate(path, **SMALL)


def test_planted_counts_come_back(synthetic):
    path, planted = synthetic
    assert planted["mismatches"] == []
    with CacheReader(path) as reader:
        assert reader.status == "complete"
        assert reader.layers == list(range(SMALL["layers"]))
        assert reader.n_tokens == planted["n_tokens"] == 64 * SMALL["seq_len"]
        table = neuron_table(reader)
        layers = layer_table(reader)
    assert len(table) == SMALL["layers"] * SMALL["d_ffn"]
    rows = layers
    for name in ("token_detectors", "bigram_detectors", "trigram_detectors"):
        assert list(rows[name]) == planted[name], name
    assert sum(planted["token_detectors"]) > 0 and sum(planted["bigram_detectors"]) > 0
    assert sum(planted["trigram_detectors"]) > 0
    for kind in KINDS:
        assert list(rows[f"pos_{kind}"]) == planted["positional"][kind], kind
        assert sum(planted["positional"][kind]) > 0, kind
    assert list(rows["pos_strong"]) == planted["positional_strong"]
    np.testing.assert_allclose(rows["dead_frac"], np.array(planted["dead"]) / SMALL["d_ffn"])
    assert planted["suppression_rows"] == sum(planted["token_detectors"])
    assert planted["hostile_triggers"]["token"] and planted["hostile_triggers"]["bigram"]
    triggers = {text for row in table["trigger_tokens"] for text in row}
    hostile = {planted["hostile_tokens"][t] for t in planted["hostile_triggers"]["token"]}
    assert hostile and hostile <= triggers


def test_statistics_are_consistent(synthetic):
    path, planted = synthetic
    with CacheReader(path) as reader:
        n_tokens = reader.n_tokens
        n_seqs = n_tokens // SMALL["seq_len"]
        vocab = reader.vocab
        for token, text in planted["hostile_tokens"].items():
            assert vocab[token] == text
        assert set(planted["hostile_tokens"].values()) == set(HOSTILE)
        pos = store.read_group(reader, "positional")
        for layer in reader.layers:
            fire = reader.array(layer, "fire_count")
            assert (fire <= n_tokens).all() and (np.diff(fire, axis=0) <= 0).all()
            g_max = reader.array(layer, "g_max")
            taus = reader.meta["recording"]["taus"]
            for i, tau in enumerate(taus):  # fired above tau exactly where the maximum is above it
                np.testing.assert_array_equal(fire[i] > 0, g_max > tau)
            value, index = reader.array(layer, "topk_value"), reader.array(layer, "topk_index")
            np.testing.assert_array_equal(value[0], g_max)
            assert (np.diff(value, axis=0) <= 0).all() and (index >= 0).all() and (index < n_tokens).all()
            seqs = np.sort(index // SMALL["seq_len"], axis=0)
            assert (np.diff(seqs, axis=0) > 0).all()  # at most one per sequence
            pos_fire = reader.array(layer, "pos_fire")
            assert pos_fire.max() <= n_seqs
            placed = pos_fire.sum(0) > 0  # where fires were placed, they add up to the fire count
            np.testing.assert_array_equal(pos_fire.sum(0)[placed], fire[0][placed])
            assert pos["positional"][layer][placed].sum() == pos["positional"][layer].sum()


def test_same_structure_as_the_real_writers(synthetic, tmp_path):
    """Rewrite the cache with cache.store.write_state and analysis_store.write_results: every group,
    dataset (dtype, shape, chunks, filters, values) and attribute is the same."""
    path, _ = synthetic
    again = tmp_path / "again.h5"
    state = read_state(path, "testing")
    write_state(again, state, state.status)
    results = []
    with CacheReader(path) as reader:
        key = store.recording_key(reader)
        for name in ("dead", "ngrams", "positional", "suppression"):
            info = store.stored(reader, name)
            result = store.Result(name, info["params"], info["inputs"])
            for k, v in store.read_group(reader, name).items():
                result.put(k, v)
            results.append(result)
        assert info["recording"] == key
    store.write_results(again, results, key)
    with h5py.File(path) as a, h5py.File(again) as b:
        assert dict(a.attrs) == dict(b.attrs)
        names_a, names_b = [], []
        a.visit(names_a.append)
        b.visit(names_b.append)
        assert sorted(names_a) == sorted(names_b)
        for name in names_a:
            x, y = a[name], b[name]
            assert type(x) is type(y), name
            assert dict(x.attrs) == dict(y.attrs), name
            if isinstance(x, h5py.Dataset):
                for prop in ("dtype", "shape", "chunks", "compression", "compression_opts", "shuffle", "fillvalue"):
                    assert getattr(x, prop) == getattr(y, prop), f"{name}.{prop}"
                np.testing.assert_array_equal(x[()], y[()], err_msg=name)
                if x.chunks:  # every chunk stored, as write_state stores them
                    assert x.id.get_num_chunks() == y.id.get_num_chunks(), name


def test_stored_analyses_are_what_analyze_computes(synthetic, tmp_path):
    path, _ = synthetic
    with CacheReader(path) as reader:
        analyzer = Analyzer(reader, {}, log=lambda _m: None)
        for name in ("dead", "ngrams", "positional", "suppression"):
            assert store.is_current(reader, name, analyzer.params_of(name), analyzer.inputs(name)), name
        assert analyzer.run(None) == {name: "current" for name in ("dead", "ngrams", "positional", "suppression")}
        stored = {name: store.read_group(reader, name) for name in ("dead", "ngrams", "positional")}
    copy = tmp_path / "copy.h5"
    shutil.copyfile(path, copy)
    with h5py.File(copy, "a") as f:
        del f["analysis"]
    with CacheReader(copy) as reader:
        analyzer = Analyzer(reader, {}, log=lambda _m: None)
        assert analyzer.run(["dead", "ngrams", "positional"]) == dict.fromkeys(("dead", "ngrams", "positional"),
                                                                               "computed")
    for name, arrays in stored.items():
        fresh = analyzer.fresh[name].arrays
        assert sorted(fresh) == sorted(arrays), name
        for key, value in arrays.items():
            assert np.asarray(fresh[key]).dtype == value.dtype, f"{name}/{key}"
            np.testing.assert_array_equal(fresh[key], value, err_msg=f"{name}/{key}")


def test_data_counts_as_the_recorder_counts(synthetic):
    from ffnscope.engine.streaming import data_counts

    path, _ = synthetic
    with CacheReader(path) as reader:
        unigram, grams = data_counts(reader.tokens(), SMALL["vocab"], 1)
        np.testing.assert_array_equal(reader.file["data/unigram"][:], unigram)
        for n, counts in reader.gram_counts().items():
            np.testing.assert_array_equal(counts.gram, grams[n].gram)
            np.testing.assert_array_equal(counts.count, grams[n].count)


def test_info_and_export_run(synthetic, tmp_path):
    path, _ = synthetic
    out = tmp_path / "neurons.csv"
    env = {**env_for_subprocess(), "COLUMNS": "200"}
    outputs = []
    for args in (["info", path], ["export", path, "--format", "csv", "--out", out]):
        done = subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert "synthetic OPT-66b-shaped" in outputs[0]
    with open(out, newline="", encoding="utf-8") as f:
        assert sum(1 for _ in csv.reader(f)) == 1 + SMALL["layers"] * SMALL["d_ffn"]
