"""The typed provenance view (cache.provenance), the reader that never hands out its HDF5 file, and
the one computation of the layer figures shared by the layer table and the TUI's layers screen."""
from __future__ import annotations

import copy
import shutil

import h5py
import numpy as np
import pytest

from ffnscope.cache.provenance import Provenance
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore.index import NeuronIndex
from ffnscope.engine.explore.tables import LAYER_KINDS, layer_table


def test_provenance_mirrors_the_stored_meta(hostile_cache):
    with CacheReader(hostile_cache) as reader:
        meta, prov = reader.meta, reader.provenance
        assert not hasattr(reader, "file")  # analysis_store reads through attrs() and datasets()
    model, rec = meta["model"], meta["recording"]
    assert (prov.model.d_ffn, prov.model.n_layers, prov.model.vocab_size, prov.model.spec) == \
        (model["d_ffn"], model["n_layers"], model["vocab_size"], model["spec"])
    assert prov.data.seq_len == meta["data"]["seq_len"] and prov.tokenizer.start_id == meta["tokenizer"]["start_id"]
    assert list(prov.recording.taus) == rec["taus"] and list(prov.recording.layers) == rec["layers"]
    assert prov.recording.taus[prov.recording.tau0_index] == 0.0
    assert prov.recording.layer_tau(rec["layers"][0]) == float(rec["primary_tau"])
    with pytest.raises(AttributeError):  # frozen: a view, never a second place to change the meta
        prov.model.d_ffn = 1


def test_older_meta_gets_the_defaults_readers_assumed(hostile_cache):
    with CacheReader(hostile_cache) as reader:
        meta = copy.deepcopy(reader.meta)
    for key in ("spec_given", "gated"):
        meta["model"].pop(key)
    for key in ("tau_rule", "layer_taus", "ngram_bound"):
        meta["recording"].pop(key, None)
    meta["recording"]["primary_tau"] = 1.0
    prov = Provenance.from_meta(meta)
    assert prov.model.spec_given == prov.model.spec and prov.model.gated is False
    assert prov.recording.tau_rule == "absolute" and not prov.recording.is_relative
    assert prov.recording.layer_tau(0) == 1.0 and prov.recording.ngram_bound is None
    meta["recording"].update(tau_rule="quantile:0.99", primary_tau=None, layer_taus={"0": 0.25, "1": None})
    prov = Provenance.from_meta(meta)
    assert prov.recording.is_relative and prov.recording.layer_tau(0) == 0.25


def test_layer_table_is_the_layers_screen_figures(hostile_cache):
    with CacheReader(hostile_cache) as reader:
        index = NeuronIndex(reader)
        figures, table = index.per_layer(), layer_table(reader)
        assert layer_table(reader, index)["layer"].tolist() == table["layer"].tolist()
    assert set(figures) == set(LAYER_KINDS)
    for name in LAYER_KINDS:
        got = [np.nan if v is None else v for v in table[name].tolist()]
        np.testing.assert_array_equal(np.asarray(got, float), figures[name].astype(float), err_msg=name)
    # outside the n-gram layers nothing is known about suppression: NaN / None, never 0
    outside = ~figures["ngram_layer"]
    for key in ("suppress_frac_logit", "suppress_frac_z"):
        assert outside.any() and np.isnan(figures[key][outside]).all()
        assert all(v is None for v, o in zip(table[key].tolist(), outside) if o)


def test_suppression_not_analysed_is_unknown_not_zero(hostile_cache, tmp_path):
    """Detectors without a suppression verdict give no suppress_frac_*: the screen showed 0 % before."""
    path = tmp_path / "no-suppression.h5"
    shutil.copy(hostile_cache, path)
    with h5py.File(path, "a") as f:
        del f["analysis/suppression"]
    with CacheReader(path) as reader:
        index = NeuronIndex(reader)
        figures = index.per_layer()
    assert not index.analyses["suppression"] and np.nansum(figures["token_detectors"]) > 0  # NaN: no n-gram layer
    assert np.isnan(figures["suppress_frac_logit"]).all() and np.isnan(figures["suppress_frac_z"]).all()
