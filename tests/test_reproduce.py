"""`ffnscope reproduce A B`: split halves of one recording compared finding by finding. A detector
planted in both halves' data is found again; one whose triggers occur in one half only is not; bad
pairs are refused in one line; `--into` stores `reproduced` in the merge, where exports and filters
read it."""
import json
import random
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ffnscope.cache.merge import merge
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.job import analyze
from ffnscope.engine.explore.index import NeuronFilter, NeuronIndex
from ffnscope.engine.explore.reproduce import (A_LEFT, A_ONLY, B_LEFT, B_ONLY, BOTH, NEITHER, OTHER, UNDECIDED,
                                               compare_tables)
from ffnscope.engine.explore.tables import NEURON_KINDS, neuron_table
from ffnscope.engine.table.table import Table
from tests.conftest import env_for_subprocess
from tests.helpers import record_tiny
from tests.tiny_models import BIGRAM, DETECTOR, VARIANTS, planted_opt, save

TOKENS, SEQ_LEN = 2048, 32
HALF_CHARS = TOKENS // 2 // SEQ_LEN * (SEQ_LEN - 1)  # part 1/2's text: its sequences' tokens after the start token
# no 'a' or 'b' at a word's end or within two characters before a 't' or an 'h': swapping them for 'o' and
# 'p' in part 2 leaves every n-gram ending at 't' or 'h', and where they stand, as in part 1
WORDS = "the cot sit on my rug then it is cold to sit with the bag big bun lamp band ban cap bay".split()


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """Parts 1/2 and 2/2 of one recording of the planted OPT, analysed, and their merge, analysed. The
    data is one document whose second half is its first with 'a' and 'b' swapped for 'o' and 'p': the
    planted DETECTOR's triggers occur in part 1 only; VARIANTS ('t') and BIGRAM ('h' after 't') see
    the same contexts at the same positions in both."""
    tmp = tmp_path_factory.mktemp("reproduce")
    rng = random.Random(0)
    first = ""
    while len(first) < HALF_CHARS:
        first += rng.choice(WORDS) + " "
    first = first[:HALF_CHARS]
    text = tmp / "text.txt"
    text.write_text(first + first.replace("a", "o").replace("b", "p"))
    model = save(planted_opt(), tmp / "model")
    options = dict(tokens=TOKENS, seq_len=SEQ_LEN, ngram_max_freq=1.0)
    a, b = tmp / "a.h5", tmp / "b.h5"
    record_tiny(a, model, [text], part=(1, 2), **options)
    record_tiny(b, model, [text], part=(2, 2), **options)
    unanalysed = tmp / "b-unanalysed.h5"
    shutil.copy(b, unanalysed)
    merged = tmp / "merged.h5"
    merge([a, b], merged)
    for path in (a, b, merged):
        analyze(path, log=lambda _m: None)
    return dict(tmp=tmp, a=a, b=b, merged=merged, model=model, text=text, options=options, unanalysed=unanalysed)


def run(*args):
    return subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], capture_output=True, text=True,
                          env=env_for_subprocess(), timeout=300)


def test_planted_detector_reproduces_and_one_half_only_does_not(halves):
    with CacheReader(halves["a"]) as a, CacheReader(halves["b"]) as b:
        table_a, table_b = neuron_table(a, [0]), neuron_table(b, [0])
    assert table_a["token_detector"][DETECTOR] and not table_b["token_detector"][DETECTOR]  # planted as meant
    comparison = compare_tables(table_a, table_b)
    codes = comparison.codes
    assert codes["token_detector"][VARIANTS] == BOTH   # 't' in both halves: found again, same triggers
    assert codes["bigram_detector"][BIGRAM] == BOTH    # 'h' after 't'
    assert codes["token_detector"][DETECTOR] == A_ONLY  # 'a', 'b' only in part 1's data
    assert codes["dead"][DETECTOR] == B_ONLY            # it never fires in part 2
    assert comparison.reproduced[VARIANTS] == 1 and comparison.reproduced[BIGRAM] == 1
    assert comparison.reproduced[DETECTOR] == 0
    token = {c.name: c for c in comparison.summary()}["token_detector"]
    assert token.a >= 2 and token.both >= 1 and token.a_share == token.both / token.a
    assert token.jaccard == token.both / (token.a + token.b - token.both)


def test_reproduce_into_the_merge_exports_and_filters(halves, tmp_path):
    a, b, merged = halves["a"], halves["b"], halves["merged"]
    done = run("reproduce", a, b, "--into", merged, "--format", "json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    cats = {c["name"]: c for c in out["categories"]}
    assert set(cats) == {"dead", "dead_tau0", "token_detector", "bigram_detector", "trigram_detector",
                         "suppresses_logit", "suppresses_z", "positional"}
    assert cats["token_detector"]["both"] >= 1 and cats["token_detector"]["a"] > cats["token_detector"]["both"]
    assert out["reproduced"]["true"] >= 2 and out["reproduced"]["false"] >= 1
    # the merge's neuron table reads the stored result: exports and --where see it
    with CacheReader(merged) as reader:
        table = neuron_table(reader, [0])
        index = NeuronIndex(reader)
        shown = index.select(NeuronFilter(reproduced=False))
    assert table.kind("reproduced") == "bool" and NEURON_KINDS["reproduced"] == "bool"
    assert table["reproduced"].tolist()[VARIANTS] is True and table["reproduced"].tolist()[DETECTOR] is False
    assert DETECTOR in shown.tolist() and VARIANTS not in shown.tolist()
    assert index.reproduce_note == ""
    jsonl = tmp_path / "n.jsonl"
    done = run("export", merged, "--table", "neurons", "--format", "jsonl", "--where", "reproduced and layer == 0",
               "--out", jsonl)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert VARIANTS in [r["neuron"] for r in rows] and DETECTOR not in [r["neuron"] for r in rows]
    assert all(r["reproduced"] is True for r in rows)
    # analyze never writes the comparison, and keeps it when it writes its own groups
    assert analyze(merged, only=["positional"], settings=["positional.mi_threshold=0.06"],
                   log=lambda _m: None) == {"positional": "computed"}
    with CacheReader(merged) as reader:
        assert neuron_table(reader, [0])["reproduced"].tolist()[VARIANTS] is True
    # a halve's own table has no comparison: unknown, never False
    with CacheReader(a) as reader:
        assert set(neuron_table(reader, [0])["reproduced"].tolist()) == {None}
    # the table for the terminal
    done = run("reproduce", a, b)
    assert done.returncode == 0, done.stderr
    assert "token detectors" in done.stdout and "Jaccard" in done.stdout and "Traceback" not in done.stderr


def test_a_damaged_stored_comparison_reads_as_unknown(halves, tmp_path):
    copy = tmp_path / "m.h5"
    shutil.copy(halves["merged"], copy)
    done = run("reproduce", halves["a"], halves["b"], "--into", copy, "--format", "json")
    assert done.returncode == 0, done.stderr
    with h5py.File(copy, "a") as f:
        del f["analysis/reproduce/reproduced"]
    with CacheReader(copy) as reader:
        index = NeuronIndex(reader)
        assert "damaged" in index.reproduce_note and (index.cols["reproduced"] == -1).all()
    jsonl = tmp_path / "n.jsonl"
    done = run("export", copy, "--table", "neurons", "--format", "jsonl", "--where", "reproduced", "--out", jsonl)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert jsonl.read_text() == ""
    done = run("reproduce", halves["a"], halves["b"], "--into", copy, "--format", "json")  # written again
    assert done.returncode == 0, done.stderr
    with CacheReader(copy) as reader:
        assert (NeuronIndex(reader).cols["reproduced"] != -1).any()


@pytest.fixture(scope="module")
def bad(halves):
    """Recordings that must not be compared with part 1/2 (none analysed: refused before that matters)."""
    tmp, text, options = halves["tmp"], halves["text"], halves["options"]
    other_model = save(planted_opt(seed=1), tmp / "other-model")
    out = {"same part": tmp / "a-again.h5", "other model": tmp / "other.h5", "other tau": tmp / "tau.h5",
           "whole": tmp / "whole.h5"}
    record_tiny(out["same part"], halves["model"], [text], part=(1, 2), **options)
    record_tiny(out["other model"], other_model, [text], part=(2, 2), **options)
    record_tiny(out["other tau"], halves["model"], [text], part=(2, 2), tau=0.5, **options)
    record_tiny(out["whole"], halves["model"], [text], **options)
    return out


@pytest.mark.parametrize("case", ["same file", "same part", "other model", "other tau", "unanalysed", "into a half",
                                  "into the whole recording"])
def test_bad_pairs_are_refused_in_one_line(halves, bad, case):
    a, b = halves["a"], halves["b"]
    args, expected = {
        "same file": ((a, a), "are the same file"),
        "same part": ((a, bad["same part"]), "of the same sequences"),
        "other model": ((a, bad["other model"]), "another model"),
        "other tau": ((a, bad["other tau"]), "another firing_rule"),
        "unanalysed": ((a, halves["unanalysed"]), "analysis yet; run `ffnscope analyze"),
        "into a half": ((a, b, "--into", a), "is one of the two recordings compared"),
        "into the whole recording": ((a, b, "--into", bad["whole"]), "is not the merge of"),
    }[case]
    done = run("reproduce", *args)
    assert done.returncode == 2, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ffnscope: error: ") and expected in lines[0], done.stderr


def _table(**columns) -> Table:
    n = len(next(iter(columns.values())))
    base = {"layer": np.zeros(n, np.int64), "neuron": np.arange(n), "dead": [False] * n, "dead_tau0": [False] * n,
            "token_detector": [False] * n, "trigger_tokens": [[]] * n, "bigram_detector": [None] * n,
            "trigger_bigrams": [[]] * n, "trigram_detector": [None] * n, "trigger_trigrams": [[]] * n,
            "suppresses_logit": [None] * n, "suppresses_z": [None] * n, "positional": [False] * n,
            "pos_type": [""] * n}
    return Table({**base, **columns}, kinds=NEURON_KINDS)


def test_codes_undecided_other_triggers_and_suppression_among_detectors_of_both():
    """Planted tables: the codes, what is left out (None in one half), detectors with other triggers,
    positional neurons of another type (found again), suppression compared on detectors of both only."""
    a = _table(token_detector=[True, True, True, None, True, False],
               trigger_tokens=[["x"], ["x"], ["x", "y"], [], ["x"], []],
               suppresses_logit=[True, True, False, None, True, None],
               positional=[True, False, None, True, False, False],
               pos_type=["other", "", "", "one_extreme", "", ""])
    b = _table(token_detector=[True, False, True, True, None, False],
               trigger_tokens=[["x"], [], ["y", "z"], ["q"], [], []],
               suppresses_logit=[True, None, False, True, None, None],
               positional=[True, False, True, True, False, False],
               pos_type=["one_extreme", "", "other", "one_extreme", "", ""])
    c = compare_tables(a, b)
    assert c.codes["token_detector"].tolist() == [BOTH, A_ONLY, OTHER, B_LEFT, A_LEFT, NEITHER]
    # suppression: only neurons 0 and 2 are detectors of both; 1 (detector in A only) is not compared
    assert c.codes["suppresses_logit"].tolist() == [BOTH, NEITHER, NEITHER, NEITHER, NEITHER, NEITHER]
    assert c.codes["positional"].tolist() == [OTHER, NEITHER, B_LEFT, BOTH, NEITHER, NEITHER]
    assert c.codes["bigram_detector"].tolist() == [UNDECIDED] * 6  # None in both: no finding known
    assert "suppresses_z" in c.not_analysed and "suppresses_logit" not in c.not_analysed
    s = {x.name: x for x in c.summary()}
    assert (s["token_detector"].a, s["token_detector"].b, s["token_detector"].both) == (3, 2, 1)
    assert (s["token_detector"].other, s["token_detector"].left_out, s["token_detector"].undecided) == (1, 2, 2)
    assert (s["suppresses_logit"].agree, s["suppresses_logit"].compared) == (2, 2)
    assert (s["positional"].both, s["positional"].same_type) == (2, 1)  # another type is still found again
    # 0: all found again (positional of another type too); 1, 2: a finding in one half only, other triggers
    assert c.reproduced.tolist() == [1, 0, 0, 1, -1, -1]


def test_absent_findings_are_not_flagged():
    """The null: two halves with no finding anywhere give no finding, no reproduced neuron, no None rows."""
    a, b = _table(token_detector=[False] * 4), _table(token_detector=[False] * 4)
    c = compare_tables(a, b)
    assert all(x.a == x.b == x.both == 0 for x in c.summary())
    assert c.reproduced.tolist() == [-1] * 4


async def test_the_neurons_screen_filters_on_reproduced(halves, tmp_path):
    """`b` on the neurons screen offers the stored comparison: reproduced, and not reproduced neurons."""
    from ffnscope.app.tui.app import FFNScopeApp
    from tests.test_tui import choose, open_neurons, shown

    merged = tmp_path / "m.h5"
    shutil.copy(halves["merged"], merged)
    done = run("reproduce", halves["a"], halves["b"], "--into", merged, "--format", "json")
    assert done.returncode == 0, done.stderr
    with CacheReader(merged) as reader:
        index = NeuronIndex(reader)
        expected = {flag: [(0, int(index.cols["neuron"][r])) for r in index.select(NeuronFilter(layers=(0,),
                                                                                                 reproduced=flag))]
                    for flag in (True, False)}
    assert (0, VARIANTS) in expected[True] and (0, DETECTOR) in expected[False]
    app = FFNScopeApp([merged], dirs=[])
    async with app.run_test(size=(80, 24)) as pilot:
        neurons = await open_neurons(pilot, 0)
        await pilot.press("b")
        await choose(pilot, "reproduced")
        assert shown(neurons) == expected[True] and neurons.filter.describe() == "reproduced"
        await pilot.press("b")
        await choose(pilot, "not_reproduced")
        assert shown(neurons) == expected[False]
