"""Every detector verdict carries its evidence (its triggers' occurrences, its fires on them, their
share of its fires) and the support rule it used (`--min-occurrences`; 1 is the paper's literal rule)."""
import json
import random
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ffnscope.app.cli import main
from ffnscope.app.tui.detail import triggers_text
from ffnscope.cache import analysis_store as store
from ffnscope.cache.reader import CacheReader
from ffnscope.cache.state import GramCounts, Sparse
from ffnscope.engine.analysis.job import analyze
from ffnscope.engine.analysis.ngrams import NgramParams, ngram_layer
from ffnscope.engine.explore.detail import neuron_detail
from ffnscope.engine.explore.index import NeuronIndex
from ffnscope.engine.explore.tables import LAYER_KINDS, neuron_table
from ffnscope.engine.table.export import read_back
from tests.conftest import env_for_subprocess
from tests.helpers import record_tiny
from tests.tiny_models import DETECTOR, MANY, VARIANTS, planted_opt, save


def sparse(rows):
    gram, neuron, count = zip(*rows)
    return Sparse.reduce([Sparse(np.array(gram, np.int64), np.array(neuron, np.int32), np.array(count, np.int64))])


# gram -> occurrences in the data; (gram, neuron, fires) the neuron's fires on it
OCCURRENCES = {4: 6, 5: 100, 7: 3, 8: 10, 9: 20}
FIRES = [(7, 0, 3),              # 0: its one trigger seen 3 times: a detector only under the paper's rule
         (8, 1, 10),             # 1: its trigger seen 10 times: a detector under both rules
         (8, 2, 5),              # 2: fires on half of gram 8's occurrences: never a detector (the null)
         (4, 3, 6), (7, 3, 3),   # 3: two triggers, 6 + 3 occurrences; without the rare one 6/9 < 95 %
         (9, 4, 20), (5, 4, 1)]  # 4: all 20 of gram 9 plus one of gram 5's 100: share 20/21


def layer(min_occurrences: int):
    keys = sorted(OCCURRENCES)
    grams = GramCounts(np.array(keys, np.int64), np.array([OCCURRENCES[g] for g in keys], np.int64))
    return ngram_layer(sparse(FIRES), grams, np.ones(5, bool), 1, NgramParams(min_occurrences=min_occurrences))


def test_evidence_is_exact_under_both_rules():
    ours, paper = layer(5), layer(1)
    assert ours.detector.tolist() == [False, True, False, False, True]
    assert paper.detector.tolist() == [True, True, False, True, True]
    # every neuron's covered triggers, summed, detector or not (gram 7 is covered only under the paper's rule)
    assert paper.trigger_occurrences.tolist() == [3, 10, 0, 9, 20]
    assert paper.trigger_fires.tolist() == [3, 10, 0, 9, 20]
    assert ours.trigger_occurrences.tolist() == [0, 10, 0, 6, 20]
    assert ours.trigger_fires.tolist() == [0, 10, 0, 6, 20]
    assert paper.fires.tolist() == [3, 10, 5, 9, 21]
    # per covered row of a detector, most fires first: (neuron, gram, fires, occurrences)
    rows = list(zip(paper.covered_neuron.tolist(), paper.covered_gram.tolist(), paper.covered_count.tolist(),
                    paper.covered_occurrences.tolist()))
    assert rows == [(0, 7, 3, 3), (1, 8, 10, 10), (3, 4, 6, 6), (3, 7, 3, 3), (4, 9, 20, 20)]
    assert list(zip(ours.covered_neuron.tolist(), ours.covered_occurrences.tolist())) == [(1, 10), (4, 20)]


# --- through the recorder, `analyze --min-occurrences`, the tables, the detail and `export` ---------------
@pytest.fixture(scope="module")
def rare_cache(tmp_path_factory):
    """The planted OPT over text holding 'a' (one of the detector's triggers) exactly 3 times and 'b' never."""
    tmp = tmp_path_factory.mktemp("evidence")
    rng = random.Random(3)
    words = "The cut sit on the mt Tom ite the tiny dog hit The cell This is it Then Ted told".split()
    text = " ".join(rng.choice(words) for _ in range(1500))
    assert "a" not in text and "b" not in text
    pieces = text.split(" ")
    for at in (100, 400, 700):  # within the recorded 4,032 text tokens
        pieces[at] = "a"
    (tmp / "text.txt").write_text(" ".join(pieces))
    cache = tmp / "c.h5"
    record_tiny(cache, save(planted_opt(), tmp / "model"), [tmp / "text.txt"], tokens=4096, seq_len=64,
                batch_tokens=128, shard_tokens=1024, ngram_max_freq=1.0)
    assert main(["analyze", str(cache)]) == 0
    return cache


def _layer0(cache):
    with CacheReader(cache) as reader:
        return {row["neuron"]: row for row in neuron_table(reader, [0]).rows()}


def _export_layers(cache, out) -> list[dict]:
    assert main(["export", str(cache), "--table", "layers", "--format", "csv", "--out", str(out), "--force"]) == 0
    return read_back(out, "csv", LAYER_KINDS)


def test_cli_rule_changes_stored_rule_counts_and_export(rare_cache, tmp_path):
    ours = _layer0(rare_cache)
    assert ours[DETECTOR]["token_detector"] is False  # 'a' seen 3 times: below the rule, no trigger
    assert ours[DETECTOR]["token_trigger_occurrences"] is None and ours[DETECTOR]["token_trigger_share"] is None
    variants = ours[VARIANTS]  # 't' and 'T', seen hundreds of times
    assert variants["token_detector"] is True and variants["token_trigger_occurrences"] > 100
    assert variants["token_trigger_fires"] >= 0.95 * variants["token_trigger_occurrences"]
    assert 0.95 <= variants["token_trigger_share"] <= 1.0
    assert ours[MANY]["token_trigger_fires"] is None  # no detector: no evidence, never 0
    before = _export_layers(rare_cache, tmp_path / "ours.csv")
    assert [row["min_occurrences"] for row in before] == [5, 5, None, None]  # n-gram layers 0-1 only

    assert main(["analyze", str(rare_cache), "--min-occurrences", "1"]) == 0
    try:
        paper = _layer0(rare_cache)
        assert paper[DETECTOR]["token_detector"] is True and sorted(paper[DETECTOR]["trigger_tokens"]) == ["a"]
        assert (paper[DETECTOR]["token_trigger_occurrences"], paper[DETECTOR]["token_trigger_fires"]) == (3, 3)
        assert paper[DETECTOR]["token_trigger_share"] == 1.0
        after = _export_layers(rare_cache, tmp_path / "paper.csv")
        assert [row["min_occurrences"] for row in after] == [1, 1, None, None]
        assert after[0]["token_detectors"] == sum(row["token_detector"] is True for row in paper.values())
        assert after[0]["token_detectors"] > before[0]["token_detectors"]
        with CacheReader(rare_cache) as reader:
            assert store.stored(reader, "ngrams")["params"]["min_occurrences"] == 1
            index = NeuronIndex(reader)
            detail = neuron_detail(reader, index, int(np.flatnonzero((index.cols["layer"] == 0)
                                                                     & (index.cols["neuron"] == DETECTOR))[0]))
        assert detail.trigger_counts[1] == [(3, 3)]
        shown = triggers_text(detail).plain
        assert "token detector: 3 fires on triggers seen 3 times, 100 % of its fires" in shown and '"a" 3/3' in shown
        assert "triggers seen >= 1 time (the paper's rule)" in shown
        report = subprocess.run([sys.executable, "-m", "ffnscope", "report", str(rare_cache)], capture_output=True,
                                text=True, env=env_for_subprocess(), timeout=300)
        assert report.returncode == 0 and "detectors: triggers seen >= 1 time (the paper's rule)" in report.stdout
    finally:
        assert main(["analyze", str(rare_cache)]) == 0  # back to the default rule for the other tests


def test_old_results_read_without_evidence_and_are_recomputed(rare_cache, tmp_path):
    """Results stored before the evidence: None evidence in every view, then `analyze` recomputes them."""
    old = tmp_path / "old.h5"
    shutil.copyfile(rare_cache, old)
    with h5py.File(old, "a") as f:
        group = f["analysis/ngrams"]
        for n in (1, 2, 3):
            for key in ("trigger_occurrences", "trigger_fires", "covered_occurrences"):
                del group[f"n{n}/{key}"]
        params = json.loads(group.attrs["params"])
        del params["columns"]
        group.attrs["params"] = json.dumps(params)
    with CacheReader(old) as reader:
        assert not reader.analysis_damage("ngrams")
        index = NeuronIndex(reader)
        row = int(np.flatnonzero((index.cols["layer"] == 0) & (index.cols["neuron"] == VARIANTS))[0])
        detail = neuron_detail(reader, index, row)
        rows = {r["neuron"]: r for r in neuron_table(reader, [0]).rows()}
    assert rows[VARIANTS]["token_detector"] is True and rows[VARIANTS]["token_trigger_occurrences"] is None
    assert detail.trigger_counts[1] == []
    assert "evidence not stored" in triggers_text(detail).plain
    assert analyze(old, log=lambda _m: None)["ngrams"] == "computed"
    assert _layer0(old)[VARIANTS]["token_trigger_occurrences"] > 100


@pytest.mark.parametrize("argv, piece", [
    (["--min-occurrences", "0"], "--min-occurrences: '0' must be a positive whole number"),
    (["--min-occurrences", "2.5"], "--min-occurrences: '2.5' is not a whole number"),
    (["--min-occurrences", "3", "--set", "ngrams.min_occurrences=4"], "disagree"),
])
def test_bad_rule_is_one_line(rare_cache, argv, piece):
    before = rare_cache.read_bytes()
    r = subprocess.run([sys.executable, "-m", "ffnscope", "analyze", str(rare_cache), *argv], capture_output=True,
                       text=True, env=env_for_subprocess(), timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("ffnscope: error:") and piece in lines[0]
    assert rare_cache.read_bytes() == before

