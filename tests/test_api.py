"""The notebook API (ffnscope.api): the same tables and detail as the CLI and the app, same code paths."""
import sys

import pytest

import ffnscope
from ffnscope.cache.errors import UserError
from tests.tiny_models import DETECTED, DETECTOR, planted_opt, save


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, text_file):
    base = tmp_path_factory.mktemp("api")
    model = save(planted_opt(), base / "model")
    out = base / "c.h5"
    ffnscope.record(out, model=str(model), data=[str(text_file)], tokens=2048, seq_len=32, shard_tokens=1024,
                    batch_tokens=64, samples=8, topk=4, device="cpu", calib_tokens=128)
    ffnscope.analyze(out)
    return out


def test_import_is_light():
    import subprocess

    probe = "import sys, ffnscope; print(sorted(m for m in ('torch', 'h5py', 'textual') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_tables_and_detail(analysed):
    from ffnscope.engine.explore.tables import neuron_table
    from ffnscope.cache.reader import CacheReader

    with ffnscope.open_recording(analysed) as rec:
        neurons = rec.neurons()
        with CacheReader(analysed, "testing") as reader:
            same = neuron_table(reader, None)
        assert neurons.columns == same.columns and len(neurons) == len(same)
        arrow = neurons.to_arrow()
        assert arrow.num_rows == len(same) and arrow.column_names == same.columns
        detectors = neurons.where("token_detector and layer == 0")
        assert DETECTOR in detectors["neuron"].tolist()
        assert rec.layers().to_arrow().num_rows == len(rec.provenance.recording.layers)
        assert rec.provenance.model.d_ffn == rec.meta["model"]["d_ffn"]  # the typed view of the stored dict
        detail = rec.neuron(0, DETECTOR)
        assert {t for t, _share in detail.triggers[1]} == {chr(c) for c in DETECTED}
        assert detail.contexts and all(c.token in {chr(c2) for c2 in DETECTED} for c in detail.contexts)
        with pytest.raises(UserError, match="no neuron 9999 of layer 0"):
            rec.neuron(0, 9999)
        with pytest.raises(UserError, match="no neuron 0 of layer 77"):
            rec.neuron(77, 0)


def test_record_refuses_unknown_options(tmp_path):
    with pytest.raises(UserError, match="unknown record option"):
        ffnscope.record(tmp_path / "x.h5", tokenz=5)


def test_one_writer_per_file_from_python_too(analysed, tmp_path):
    """A cache another process is writing (its lock held) is refused by record and analyze alike."""
    import subprocess

    hold = ("import sys, time; from pathlib import Path; from ffnscope.cache.lock import locked\n"
            "with locked(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(analysed)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another ffnscope process .* is working on"):
            ffnscope.analyze(analysed)
        with pytest.raises(UserError, match="another ffnscope process .* is working on"):
            ffnscope.record(analysed, force=True, tokens=2048)
    finally:
        holder.kill()
        holder.wait()
    with ffnscope.open_recording(analysed) as rec:  # untouched
        assert len(rec.layers()) == 4 and len(rec.neurons()) > 0
