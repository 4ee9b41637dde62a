"""`ffnscope npl ...` as subprocesses on the planted OPT recording (OPT runs its FFN on flattened
(B*T, d) rows: the hooks must give every consumer (B, T, d)), the NPL columns in the exported
neuron table, and the NPL screen of the TUI starting real jobs."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from ffnscope.app.tui.app import FFNScopeApp
from ffnscope.app.tui.layers import LayersScreen
from ffnscope.app.tui.modals import AskScreen, ChooseScreen
from ffnscope.app.tui.neurons import NeuronsScreen
from ffnscope.app.tui.npl import FITS, NplScreen
from ffnscope.cache.npl_store import NplReader, sidecar_path
from ffnscope.engine.jobs import launcher as jobs
from ffnscope.engine.explore.tables import NEURON_KINDS
from ffnscope.engine.table.export import read_back
from tests.conftest import env_for_subprocess
from tests.tui_helpers import screen_text, settle, wait_for, wait_screen


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], capture_output=True, text=True,
                          env=env_for_subprocess(), timeout=timeout)


@pytest.fixture(scope="module")
def npl_cache(hostile_cache, tmp_path_factory):
    """A copy of the planted recording with adjacent maps, Table 1 and background neurons."""
    cache = tmp_path_factory.mktemp("npl") / "c.h5"
    shutil.copyfile(hostile_cache, cache)
    fit = run_cli("npl", "fit", cache, "--tokens", "2048", "--device", "cpu", "--quiet")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "exact: held-out L2 distance per token" in fit.stdout
    # the recording's 64 sequences are the fit's 64 (--tokens 2048); the held-out ones come after them
    held = "held-out: 16 sequences, 512 tokens, from "
    assert f"{held}{text_file_of(cache)} past the first 64 sequences of its packing (the recording's 64" in fit.stdout
    subst = run_cli("npl", "substitute", cache, "--seeds", "1", "--device", "cpu", "--quiet")
    assert subst.returncode == 0, subst.stderr[-3000:]
    assert "NPL" in subst.stdout and "Original" in subst.stdout and "tokens/s" in subst.stdout
    assert held in subst.stdout
    func = run_cli("npl", "functional", cache, "--device", "cpu", "--quiet")
    assert func.returncode == 0, func.stderr[-3000:]
    return cache


def test_show_reads_without_torch(npl_cache):
    probe = ("import sys; from ffnscope.app.cli import main\nmain(['npl', 'show', sys.argv[1]])\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    result = subprocess.run([sys.executable, "-c", probe, str(npl_cache)], capture_output=True, text=True,
                            env=env_for_subprocess(), timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rows i, columns j" in out and "substitution perplexity (Table 1)" in out and "S_all" in out
    assert out.count("held-out: 16 sequences, 512 tokens, from ") == 3  # the fit, Table 1, functional neurons
    assert out.strip().endswith("NO-TORCH")


def test_export_has_npl_columns(npl_cache, tmp_path):
    out = tmp_path / "n.jsonl"
    result = run_cli("export", npl_cache, "--format", "jsonl", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = read_back(out, "jsonl", NEURON_KINDS)
    with NplReader(sidecar_path(npl_cache)) as reader:
        l2 = reader.metrics(1, 2)["l2"]
    layer2 = [r for r in rows if r["layer"] == 2]
    np.testing.assert_allclose([r["npl_l2"] for r in layer2], l2)
    assert all(r["npl_l2"] is None for r in rows if r["layer"] == 0)  # no map into layer 0
    assert {r["background"] for r in layer2} == {True, False}
    background = run_cli("export", npl_cache, "--where", "background", "--format", "csv", "--out", tmp_path / "b.csv")
    assert background.returncode == 0 and f"wrote {sum(r['background'] is True for r in rows):,} rows" in background.stdout


def test_substitute_refuses_overlapping_heldout_text(npl_cache, text_file):
    """The fit read the recording's own source; giving it again as held-out text shares sequences."""
    result = run_cli("npl", "substitute", npl_cache, "--heldout-data", text_file, "--seeds", "1", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "share" in result.stderr and result.stderr.count("\n") == 1


def text_file_of(cache) -> str:
    from ffnscope.cache.reader import CacheReader

    with CacheReader(cache) as reader:
        return reader.meta["data"]["sources"][0]["path"]


def test_a_source_too_small_for_heldout_text_is_refused_and_heldout_data_is_checked(model_dirs, tmp_path, text_file):
    """24 of the small source's 32 sequences are recorded: 8 fresh ones are too few for 16 held out."""
    from ffnscope.cache.reader import CacheReader
    from ffnscope.cache.npl_store import sequence_hashes
    from tests.helpers import record_tiny

    text = text_file.read_text()
    small, other = tmp_path / "small.txt", tmp_path / "other.txt"
    small.write_text(text[:1000])
    other.write_text(text[20000:])
    cache = tmp_path / "c.h5"
    record_tiny(cache, model_dirs["opt"], [small])
    refused = run_cli("npl", "fit", cache, "--device", "cpu", "--quiet")
    [line] = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and line.startswith("ffnscope: error: ") and "--heldout-data FILE" in line
    assert "after the recording's 24 and the fit's 24, 8 fresh ones are left" in line, line
    assert not sidecar_path(cache).exists() and not (tmp_path / "c.h5.npl.h5.progress.json").exists()
    shared = run_cli("npl", "fit", cache, "--device", "cpu", "--quiet", "--heldout-data", small)
    assert "Traceback" not in shared.stderr
    [line] = shared.stderr.strip().splitlines()
    assert shared.returncode == 2 and "shares 16 of its 16 sequences with the recording's or the fit's data" in line
    fit = run_cli("npl", "fit", cache, "--device", "cpu", "--quiet", "--heldout-data", other)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert f"held-out: 16 sequences, 512 tokens, from {other} (--heldout-data)" in fit.stdout
    with CacheReader(cache) as reader:
        recorded = sequence_hashes(reader.tokens())
    with NplReader(sidecar_path(cache)) as reader:
        held, fit_hashes = reader.heldout_hashes(), reader.fit_hashes()
        assert reader.meta["fit"]["heldout"]["seqs"] == 16 and len(held) == 16
    assert len(fit_hashes) == 32 and not np.isin(held, np.concatenate([recorded, fit_hashes])).any()
    gone = run_cli("npl", "substitute", cache, "--data", other)
    assert gone.returncode == 2 and "--data is gone: held-out text is given with --heldout-data" in gone.stderr


def test_sidecar_of_another_recording_is_refused(npl_cache, hostile_cache, tmp_path, text_file, model_dirs):
    from tests.helpers import record_tiny

    other = tmp_path / "other.h5"
    record_tiny(other, model_dirs["opt"], [text_file], tokens=1024)
    shutil.copyfile(sidecar_path(npl_cache), sidecar_path(other))
    result = run_cli("npl", "substitute", other, "--seeds", "1", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "npl fit" in result.stderr


async def test_npl_screen_fits_and_finds_background_neurons(hostile_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FFNSCOPE_CACHE_DIR", str(tmp_path / "uc"))
    cache = tmp_path / "c.h5"
    shutil.copyfile(hostile_cache, cache)
    app = FFNScopeApp([cache], dirs=[])
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_screen(pilot, LayersScreen)
        await pilot.press("n")
        screen = await wait_screen(pilot, NplScreen)
        assert "no NPL maps yet" in screen_text(app)
        await pilot.press("f")
        await wait_screen(pilot, ChooseScreen)
        await pilot.press("home", *["down"] * [v for v, _ in FITS].index("adjacent|both"), "enter")
        await wait_screen(pilot, AskScreen)
        app.screen.query_one("Input").value = "2048"
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.view.exists and screen.job is not None
                       and screen.job.status == jobs.COMPLETE, 180, "the fit job")
        assert sidecar_path(cache) in app.started_jobs
        assert set(screen.view.pairs) == {"exact", "adagrad"}
        text = screen_text(app)
        assert "rows i, columns j" in text and "exact L2 distance per token" in text
        await pilot.press("u")
        await wait_for(pilot, lambda: "functional" in screen.view.results, 180, "the functional job")
        await pilot.press("escape")
        await wait_screen(pilot, LayersScreen)
        await pilot.press("a")
        neurons = await wait_screen(pilot, NeuronsScreen)
        await wait_for(pilot, lambda: (neurons.index.cols["background"] != -1).any(), 30, "the reloaded index")
        await pilot.press("b")                       # a choice: background, or split-half (not) reproduced
        await wait_screen(pilot, ChooseScreen)
        await pilot.press("home", "down", "enter")   # the second: NPL background neurons
        await wait_screen(pilot, NeuronsScreen)
        await settle(pilot)
        want = np.flatnonzero(neurons.index.cols["background"] == 1)
        assert len(want) and np.array_equal(neurons.rows, want)
        assert "background" in screen_text(app)
def test_memory_options_are_checked_up_front_and_reach_the_jobs(npl_cache, tmp_path):
    for action in ("fit", "substitute", "functional"):
        bad = run_cli("npl", action, npl_cache, "--host-memory", "lots", "--device", "cpu")
        assert bad.returncode == 2 and "--host-memory 'lots' is not a size" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        zero = run_cli("npl", action, npl_cache, "--device-memory", "0", "--device", "cpu", "--quiet")
        [line] = zero.stderr.strip().splitlines()  # refused by the parser now
        assert zero.returncode == 2 and line.startswith("ffnscope: error: argument --device-memory: '0' must be")
    small = run_cli("npl", "substitute", npl_cache, "--host-memory", "1MiB", "--device", "cpu", "--quiet")
    assert small.returncode == 2 and "--host-memory 1.0 MiB does not hold" in small.stderr
