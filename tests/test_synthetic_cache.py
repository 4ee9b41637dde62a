"""tests/synthetic_cache.py: a small synthetic cache is a cache like any other, its stored analyses are
what `analyze` computes from it (and counts as current), and what it says it planted comes back."""
import csv
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ffnscope.cache import analysis_store as store
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore.tables import layer_table, neuron_table
from ffnscope.engine.analysis.positional import KINDS
from ffnscope.engine.analysis.job import Analyzer
from tests import synthetic_cache
from tests.conftest import env_for_subprocess
from tests.synthetic_cache import HOSTILE, generate

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
    ngram = list(rows["ngram_layer"])
    for name in ("token_detectors", "bigram_detectors", "trigram_detectors"):  # not known outside n-gram layers
        assert list(rows[name]) == [v if n else None for v, n in zip(planted[name], ngram)], name
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


def test_layers_are_made_one_at_a_time(synthetic):
    """write_state reads the layers in turn: the recording is never whole in memory."""
    _path, planted = synthetic
    assert planted["layers"] >= 4 and planted["most_layers_in_memory"] == 2


def test_command_line(tmp_path, capsys):
    assert synthetic_cache.main([str(tmp_path / "x.h5"), "--layers", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: need seq_len >= 64")
    assert not (tmp_path / "x.h5").exists()


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
    from ffnscope.engine.record.grams import data_counts

    path, _ = synthetic
    with CacheReader(path) as reader:
        unigram, grams = data_counts(reader.tokens(), SMALL["vocab"], 1)
        np.testing.assert_array_equal(reader.unigram(), unigram)
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
