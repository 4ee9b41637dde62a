"""The explorer's fast paths give what the plain ones gave: `r` flips the kept order instead of sorting
again, opening reads only what the screens show (the rest on first use, the same values; a failure
then is one line), a closed dialog leaves the footer as it was, the record form's estimate opens no
cache, and the recordings list waits for the recording being opened and reads an open one through its
reader. Behaviour only: nothing here is timed."""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from textual.widgets import Footer

from ffnscope.app.tui.app import FFNScopeApp
from ffnscope.app.tui.detail import DetailScreen
from ffnscope.app.tui.layers import LayersScreen
from ffnscope.app.tui.neurons import NeuronsScreen
from ffnscope.app.tui.recording import OpenRecording
from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore import catalog, estimate
from ffnscope.engine.explore.catalog import RecordingSummary
from ffnscope.engine.explore.estimate import Speed
from ffnscope.engine.explore.index import SORT_KEYS, UNKNOWN, NeuronFilter, NeuronIndex
from tests.test_tui import choose
from tests.tui_helpers import screen_text, settle, wait_screen

SIZE = (80, 24)


def reference_order(index: NeuronIndex, key: str, rows: np.ndarray, descending: bool) -> list[int]:
    """`rows` by `key` as the neurons screen sorts, written plainly: known values first (ties at float32
    resolution, -0 before +0, in row order), unknown ones last in row order."""
    values = index.column(key)[rows]
    if values.dtype.kind == "f":
        unknown = np.isnan(values)
    elif values.dtype == np.int8 or key == "unigram_coverage":
        unknown = values == UNKNOWN
    else:
        unknown = values == 0 if key == "pos_type" else np.zeros(len(rows), bool)
    sign = -1 if descending else 1

    def order(i):
        value = float(np.float32(values[i]))
        return (sign * value, sign * math.copysign(1.0, value), int(rows[i]))
    known = sorted((i for i in range(len(rows)) if not unknown[i]), key=order)
    return [int(rows[i]) for i in known] + [int(r) for r in rows[unknown]]


def test_reverse_flips_the_kept_order_without_sorting_again(hostile_cache, monkeypatch):
    with CacheReader(hostile_cache) as reader:
        index = NeuronIndex(reader)
        everything = np.arange(index.n)
        alive = np.flatnonzero(~index.cols["dead"])
        assert len(alive) > index.n // 4  # a filtered selection still cut from the kept order
        for key in SORT_KEYS:
            for descending in (True, False):
                index._orders.clear()
                first = index.select(NeuronFilter(), key, descending)
                assert first.tolist() == reference_order(index, key, everything, descending), key
                with monkeypatch.context() as patch:  # the other direction, and back, without a sort
                    patch.setattr(NeuronIndex, "sort_keys", lambda *a: pytest.fail("sorted again"))
                    patch.setattr("ffnscope.engine.explore.index._argsort_bits", lambda *a: pytest.fail("sorted"),
                                  raising=False)
                    for direction in (not descending, descending, not descending):
                        got = index.select(NeuronFilter(), key, direction)
                        assert got.tolist() == reference_order(index, key, everything, direction), (key, direction)
                        got = index.select(NeuronFilter(dead=False), key, direction)  # a cached sort after a filter
                        assert got.tolist() == reference_order(index, key, alive, direction), (key, direction)
        assert index.select(NeuronFilter(), "layer", True).tolist() == reference_order(index, "layer", everything,
                                                                                       True)


def test_opening_reads_only_what_the_screens_show(hostile_cache, monkeypatch):
    """The detector evidence's fire counts, the plug-in MI and the activation statistics are read on first
    use, and then hold what the file holds."""
    read: list[str] = []
    datasets, array = CacheReader.datasets, CacheReader.array

    def spy_datasets(self, path, keys=None):
        out = datasets(self, path, keys)
        read.extend(f"{path}/{key}" for key in out)
        return out

    def spy_array(self, layer, name, rows=slice(None)):
        read.append(f"layers/{name}")
        return array(self, layer, name, rows)
    monkeypatch.setattr(CacheReader, "datasets", spy_datasets)
    monkeypatch.setattr(CacheReader, "array", spy_array)
    with CacheReader(hostile_cache) as reader:
        later = {"analysis/ngrams/n1/fires", "analysis/ngrams/n1/trigger_fires",
                 "analysis/ngrams/n1/trigger_occurrences", "analysis/positional/mi_plugin", "layers/g_sumsq",
                 "layers/g_sum", "layers/g_max"}
        index = NeuronIndex(reader)
        assert not later & set(read), later & set(read)
        figures = index.per_layer(dead_sq=False)  # the layers screen's
        assert not later & set(read), later & set(read)
        assert "dead_sq_frac" not in figures and "g_sumsq" not in index.cols
        everything = index.per_layer()
        assert all(np.array_equal(figures[k], everything[k], equal_nan=True) for k in figures)
        assert set(everything) - set(figures) == {"dead_sq_frac"}

        read.clear()
        index.column("g_max")  # alone: one array per layer, not the three of the mean and std
        assert set(read) == {"layers/g_max"}
        with h5py.File(hostile_cache, "r") as f:
            ngrams, pos = f["analysis/ngrams"], f["analysis/positional"]
            layers = [int(layer) for layer in ngrams["layers"][()]]
            fires = {layer: ngrams["n1/fires"][row] for row, layer in enumerate(layers)}
            rows = index.rows_of(ngrams["n1/covered_layer"][()], ngrams["n1/covered_neuron"][()])
            share = ngrams["n1/covered_count"][()] / np.maximum(
                [fires[int(index.cols["layer"][r])][int(index.cols["neuron"][r])] for r in rows], 1)
            plugin = np.concatenate([pos["mi_plugin"][row] for row in range(len(pos["layers"]))])
            g_max = np.concatenate([f[schema.layer_group(layer)]["g_max"][()] for layer in index.layers])
            trigger_fires = {layer: ngrams["n1/trigger_fires"][row] for row, layer in enumerate(layers)}
        order = np.argsort(rows, kind="stable")
        np.testing.assert_array_equal(index.triggers[1].values, share[order])
        np.testing.assert_array_equal(index.column("pos_mi_plugin"), plugin)
        np.testing.assert_array_equal(index.column("g_max"), g_max)
        detectors = np.flatnonzero(index.cols["token_detector"] == 1)
        assert len(detectors)
        want = [int(trigger_fires[int(index.cols["layer"][r])][int(index.cols["neuron"][r])]) for r in detectors]
        assert index.evidence_values("token_trigger_fires", detectors) == want


async def test_a_closed_dialog_leaves_the_footer_as_it_was(hostile_cache, monkeypatch):
    """Textual rebuilds a footer whenever the bindings may have changed, as when a dialog closes; the
    neurons screen's keys are the same before and after, so its footer stays."""
    rebuilt: list = []
    recompose = Footer.recompose

    async def counting(self):
        rebuilt.append(type(self.screen).__name__)
        await recompose(self)
    monkeypatch.setattr(Footer, "recompose", counting)
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_screen(pilot, LayersScreen)
        await pilot.press("a")
        neurons = await wait_screen(pilot, NeuronsScreen)
        assert "NeuronsScreen" in rebuilt  # built once, when its keys first came
        rebuilt.clear()
        await pilot.press("t")
        await choose(pilot, "token")
        assert neurons.filter.detector == "token" and app.screen is neurons
        await pilot.press("s")
        await choose(pilot, "fire_freq")
        assert "NeuronsScreen" not in rebuilt
        assert "det" in screen_text(app) and "sort" in screen_text(app)  # the footer still shows the keys


def test_the_form_estimate_opens_no_cache(hostile_cache, tmp_path, monkeypatch):
    """The speed a recording stores comes with its catalog row: the record form's estimate, asked at each
    keystroke, reads no cache file."""
    summary = catalog.summarize(hostile_cache)
    with CacheReader(hostile_cache) as reader:
        rate, layers = reader.provenance.recording.tokens_per_s, len(reader.provenance.recording.layers)
    assert rate and summary.tokens_per_s == rate
    cache = tmp_path / "a.h5"
    cache.with_name("a.h5.progress.json").write_text('{"status": "complete", "command": ["ffnscope", "record", '
                                                     '"--model", "default"]}')
    row = RecordingSummary(path=cache, name="a.h5", status="complete", created="2026-01-01T00:00:00Z",
                           n_layers=layers, model_layers=30, tokens_per_s=rate)
    monkeypatch.setattr(estimate, "CacheReader", lambda *a, **k: pytest.fail("a cache was opened"))
    assert estimate.latest_speed([row], "default") == Speed(float(rate), "a.h5", layers, 30)


async def test_the_recordings_list_waits_for_the_recording_being_opened(hostile_cache, monkeypatch):
    """Both read HDF5, which runs one call at a time: the list's first scan comes after the open."""
    events: list[str] = []
    opening, summarize = OpenRecording.__init__, catalog.summarize

    def slow_open(self, path):
        events.append("open")
        time.sleep(0.5)  # a big cache
        opening(self, path)
        events.append("opened")

    def listing(path, *opened):
        events.append("summarize")
        return summarize(path, *opened)
    monkeypatch.setattr(OpenRecording, "__init__", slow_open)
    monkeypatch.setattr(catalog, "summarize", listing)
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_screen(pilot, LayersScreen)
        await settle(pilot)
    assert events.index("opened") < events.index("summarize"), events


def test_the_list_reads_an_open_recording_through_its_reader(hostile_cache, tmp_path, monkeypatch):
    """The recordings list summarizes a recording the app holds open from its reader, unless the file has
    been replaced since it was opened."""
    path = tmp_path / "c.h5"
    shutil.copyfile(hostile_cache, path)
    rec = OpenRecording(path)
    opened: list[Path] = []
    reader = catalog.CacheReader

    def opening(file, *args):
        opened.append(Path(file))
        return reader(file, *args)
    monkeypatch.setattr(catalog, "CacheReader", opening)
    [row] = catalog.scan([path], [], {rec.path: (rec.reader, rec.mtime[0])})
    assert opened == [] and row.status == "complete" and row.analyzed and row.n_tokens == rec.n_tokens
    os.utime(path, ns=(rec.mtime[0] + 10**9, rec.mtime[0] + 10**9))  # as a job replacing the file would
    [again] = catalog.scan([path], [], {rec.path: (rec.reader, rec.mtime[0])})
    assert opened == [path] and again == row
    rec.close()


async def test_a_neuron_whose_evidence_cannot_be_read_is_one_line(hostile_cache, monkeypatch):
    """The detector evidence is read when a neuron's detail first needs it: a file that fails there says
    so in one line, and the app goes on."""
    def damaged(self):
        raise UserError(f"{hostile_cache} cannot be read: HDF5 failed on it")
    monkeypatch.setattr(NeuronIndex, "_read_evidence", damaged)
    app = FFNScopeApp([hostile_cache], dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_screen(pilot, LayersScreen)
        await pilot.press("enter")
        await wait_screen(pilot, NeuronsScreen)
        await pilot.press("enter")
        await wait_screen(pilot, DetailScreen)
        notice = list(app._notifications)[-1].message
        assert "cannot be read" in notice and "\n" not in notice
    assert app.return_code in (None, 0)
