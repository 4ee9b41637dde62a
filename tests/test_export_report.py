"""export and report through the CLI, on a planted recording whose token strings are hostile."""
import subprocess
import sys

import pytest

from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore.tables import LAYER_KINDS, NEURON_KINDS, neuron_table
from ffnscope.engine.analysis.job import analyze
from ffnscope.engine.table.export import read_back
from tests.conftest import env_for_subprocess
from tests.helpers import HOSTILE, record_tiny
from tests.tiny_models import DEAD, DETECTOR, OSCILLATING


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], capture_output=True, text=True,
                          env=env_for_subprocess(), timeout=300)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_neuron_export_round_trips(hostile_cache, tmp_path, fmt):
    out = tmp_path / f"neurons.{fmt}"
    result = run_cli("export", hostile_cache, "--table", "neurons", "--format", fmt, "--out", out)
    assert result.returncode == 0, result.stderr
    with CacheReader(hostile_cache) as reader:
        expected = list(neuron_table(reader).rows())
    rows = read_back(out, fmt, NEURON_KINDS)
    assert rows == expected
    detector = next(r for r in rows if r["layer"] == 0 and r["neuron"] == DETECTOR)
    assert sorted(detector["trigger_tokens"]) == sorted(HOSTILE.values())  # exactly, escapes and all


def test_csv_cells_are_guarded(hostile_cache, tmp_path):
    import csv

    out = tmp_path / "n.csv"
    assert run_cli("export", hostile_cache, "--format", "csv", "--detector", "token", "--out", out).returncode == 0
    with open(out, newline="", encoding="utf-8") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert not any(cell.startswith(("=", "+", "@")) for cell in cells)
    assert any("HYPERLINK" in cell for cell in cells)


def test_export_filters(hostile_cache, tmp_path):
    def rows(*options):
        out = tmp_path / "f.jsonl"
        result = run_cli("export", hostile_cache, "--format", "jsonl", "--out", out, "--force", *options)  # one file
        assert result.returncode == 0, result.stderr
        return read_back(out, "jsonl", NEURON_KINDS)

    assert {(r["layer"], r["neuron"]) for r in rows("--dead", "--layers", "0")} >= {(0, DEAD)}
    assert all(r["dead"] for r in rows("--dead"))
    assert all(r["token_detector"] for r in rows("--detector", "token"))
    assert (0, DETECTOR) in {(r["layer"], r["neuron"]) for r in rows("--detector", "token")}
    assert [(r["layer"], r["neuron"]) for r in rows("--positional", "oscillatory", "--layers", "0")] == [(0, OSCILLATING)]
    assert rows("--where", "layer == 1 and fire_freq > 2") == []
    bad = run_cli("export", hostile_cache, "--where", "nonsense > 1", "--out", tmp_path / "x.csv")
    assert bad.returncode == 2 and "nonsense" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_layer_table_markdown(hostile_cache, tmp_path):
    out = tmp_path / "layers.md"
    assert run_cli("export", hostile_cache, "--table", "layers", "--format", "markdown", "--out", out).returncode == 0
    lines = out.read_text().replace("\\_", "_").splitlines()  # markdown escapes underscores
    assert len(lines) == 4 + 2 and lines[0].startswith("|")
    assert set(LAYER_KINDS) == {c.strip() for c in lines[0].strip().strip("|").split("|")}


def test_export_without_analyses_says_what_to_do(tmp_path, model_dirs, text_file):
    cache = tmp_path / "c.h5"
    record_tiny(cache, model_dirs["opt"], [text_file])
    result = run_cli("export", cache, "--out", tmp_path / "x.csv")
    assert result.returncode == 2 and "ffnscope analyze" in result.stderr


def test_report_overlays_recordings(hostile_cache, tmp_path, model_dirs, text_file):
    other = tmp_path / "gpt2.h5"
    record_tiny(other, model_dirs["gpt2"], [text_file], tokens=1024, ngram_max_freq=1.0)
    analyze(other, log=lambda _m: None)
    result = run_cli("report", hostile_cache, other)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for title in ("dead neurons (Fig. 1a)", "token-detecting neurons (Fig. 3a)", "positional neurons (Fig. 8)",
                  "Fig. 2", "suppressing"):
        assert title in text
    assert "OPT, 4L" in text and "GPT2, 4L" in text  # one series per model
    assert "\x1b[31m" not in text  # the hostile token never reaches the terminal as an escape
