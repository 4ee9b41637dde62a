"""An analysis that cannot decide exports no verdict (an empty CSV/Markdown cell, JSON null, a Parquet null),
never false or 0, at the neuron and the layer level; one that decided and found nothing exports false / 0.

Planted: the tiny OPT of tests.tiny_models (position-range, oscillating and one-sided neurons in layer 0,
content neurons beside them) recorded over 8 sequences of 32 tokens, too few per position to call
positional neurons, and over 12, enough (tests/test_positional.py). n-gram layers are the first half,
so layers 2 and 3 have no detector counts."""
from __future__ import annotations

import csv
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from ffnscope.app.export_view import run_export
from ffnscope.cache import analysis_store as store
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.job import analyze
from ffnscope.engine.analysis.positional import KINDS
from ffnscope.engine.explore.index import NeuronFilter, NeuronIndex
from tests.helpers import record_tiny
from tests.tiny_models import DETECTOR, POSITIONAL, planted_opt, save

FORMATS = ("csv", "jsonl", "parquet", "markdown")
POS_COUNTS = ("positional", *(f"pos_{k}" for k in KINDS), "pos_strong")
NGRAM_COUNTS = ("token_detectors", "bigram_detectors", "trigram_detectors", "detected_tokens", "new_tokens",
                "new_vs_previous", "cumulative_tokens", "detected_trigrams", "new_trigrams")
TEXT = {"csv", "markdown"}  # formats whose cells are text: the empty value is "", numbers are written out


@pytest.fixture(scope="module")
def caches(tmp_path_factory, text_file):
    """n_seqs -> an analysed recording of the planted model over n_seqs sequences of 32 tokens."""
    base = tmp_path_factory.mktemp("no_verdict")
    model = save(planted_opt(), base / "model")
    out = {}
    for n_seqs in (8, 12):
        cache = base / f"c{n_seqs}.h5"
        record_tiny(cache, model, [text_file], tokens=n_seqs * 32, seq_len=32, ngram_max_freq=1.0)
        analyze(cache, log=lambda _m: None)
        out[n_seqs] = cache
    return out


def exported(cache, table: str, fmt: str, tmp_path) -> list[dict]:
    """`ffnscope export` of a table, read back as written: CSV and Markdown cells as text, JSON and
    Parquet values as Python values (None for null)."""
    out = tmp_path / f"{cache.stem}-{table}.{fmt}"
    run_export(SimpleNamespace(file=cache, layers=None, table=table, dead=None, detector=None, positional=None,
                               where=None, out=out, format=fmt, force=True))
    if fmt == "csv":
        with open(out, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if fmt == "jsonl":
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(out).to_pylist()
    lines = out.read_text(encoding="utf-8").splitlines()
    split = [[re.sub(r"\\(.)", r"\1", cell.strip()) for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
             for line in lines]  # markdown's specials (the _ in names) are backslash-escaped
    return [dict(zip(split[0], row)) for row in split[2:]]  # the second line is the alignment row


def empty(fmt: str):
    return "" if fmt in TEXT else None


def written(value, fmt: str):
    """A bool or int as the format writes it."""
    if fmt not in TEXT:
        return value
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def stored_positional(cache) -> dict:
    with CacheReader(cache) as reader:
        return store.read_group(reader, "positional")


@pytest.mark.parametrize("fmt", FORMATS)
def test_undecidable_positional_exports_no_verdict(caches, tmp_path, fmt):
    assert stored_positional(caches[8])["too_few"]
    neurons = exported(caches[8], "neurons", fmt, tmp_path)
    assert len(neurons) == 4 * 64
    for row in neurons:
        assert (row["positional"], row["pos_strong"], row["pos_type"]) == (empty(fmt), empty(fmt), ""), row
        assert row["pos_mi_plugin"] not in ("", None)  # measured all the same: the paper's plug-in MI
    layers = exported(caches[8], "layers", fmt, tmp_path)
    assert [row[key] for row in layers for key in POS_COUNTS] == [empty(fmt)] * (4 * len(POS_COUNTS))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decided_positional_exports_true_false_and_counts(caches, tmp_path, fmt):
    """Enough sequences: every neuron has a verdict; the content neuron's is false (tested, not positional)
    and every layer count is a number, zeros included."""
    pos = stored_positional(caches[12])
    assert not pos["too_few"]
    neurons = exported(caches[12], "neurons", fmt, tmp_path)
    by_neuron = {(int(r["layer"]), int(r["neuron"])): r for r in neurons}
    for neuron, verdict in ((POSITIONAL, True), (DETECTOR, False)):
        row = by_neuron[0, neuron]
        assert (row["positional"], row["pos_strong"]) == (written(verdict, fmt),) * 2
    assert {r["positional"] for r in neurons} == {written(True, fmt), written(False, fmt)}
    plugin = [float(by_neuron[int(layer), n]["pos_mi_plugin"]) for layer in pos["layers"] for n in range(64)]
    np.testing.assert_allclose(plugin, pos["mi_plugin"].reshape(-1), rtol=0 if fmt != "markdown" else 1e-12)
    layers = exported(caches[12], "layers", fmt, tmp_path)
    positional, kind, strong = pos["positional"], pos["kind"], pos["strong"]
    want = {"positional": positional.sum(1), "pos_strong": (positional & strong).sum(1),
            **{f"pos_{k}": (positional & (kind == i)).sum(1) for i, k in enumerate(KINDS, start=1)}}
    for key in POS_COUNTS:
        assert [row[key] for row in layers] == [written(int(v), fmt) for v in want[key]], key
    assert written(0, fmt) in [row[key] for row in layers for key in POS_COUNTS]  # a decided zero is 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_ngram_counts_outside_the_ngram_layers_are_empty(caches, tmp_path, fmt):
    layers = exported(caches[12], "layers", fmt, tmp_path)
    assert [row["ngram_layer"] for row in layers] == [written(v, fmt) for v in (True, True, False, False)]
    for row in layers[2:]:
        assert {row[key] for key in NGRAM_COUNTS} == {empty(fmt)}, row
    assert layers[1]["token_detectors"] == written(0, fmt)  # an n-gram layer without detectors: 0, known
    assert layers[0]["token_detectors"] not in ("", None, written(0, fmt))


def test_positional_filter_without_verdict_selects_nothing(caches):
    for n_seqs, want in ((8, False), (12, True)):
        with CacheReader(caches[n_seqs]) as reader:
            index = NeuronIndex(reader)
            rows = index.select(NeuronFilter(positional="any"))
            assert (index.offset[0] + POSITIONAL in rows) is want
            assert bool(index.pos_note) is not want
            figures = index.per_layer()
        assert bool(np.isnan(figures["positional"]).all()) is not want  # the layer counts: unknown, not 0


async def test_neurons_screen_says_why_a_positional_filter_is_empty(caches):
    from ffnscope.app.tui.app import FFNScopeApp
    from ffnscope.app.tui.neurons import NeuronsScreen
    from ffnscope.app.tui.layers import LayersScreen
    from tests.test_tui import choose
    from tests.tui_helpers import screen_text, wait_screen

    app = FFNScopeApp([caches[8]], dirs=[])
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_screen(pilot, LayersScreen)
        assert "- (too few seqs)" in screen_text(app)  # the layer counts: no verdict, not 0
        await pilot.press("enter")
        neurons = await wait_screen(pilot, NeuronsScreen)
        assert {neurons._cell(i, "type") for i in range(len(neurons.rows))} == {"-"}  # no verdict, not ""
        await pilot.press("p")
        await choose(pilot, "any")
        text = " ".join(screen_text(app).split())
        assert len(neurons.rows) == 0 and "0 match" in text
        assert "too few sequences per position (8) to call positional neurons" in text
