"""Bad input: one line on stderr naming the problem and the fix, exit 2, no traceback, and never a
cache that looks complete."""
import subprocess
import sys

import h5py
import numpy as np
import pytest
import transformers as tf

from ffnscope.cache.store import read_state
from tests.conftest import env_for_subprocess
from tests.helpers import record_tiny

SMALL = ["--tokens", "256", "--seq-len", "32", "--device", "cpu", "--quiet", "--samples", "8"]


def run_cli(*args, env_extra=None):
    env = env_for_subprocess()
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("ffnscope: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_not_complete(path):
    if path.exists():
        with h5py.File(path, "r") as f:
            assert f.attrs["status"] != "complete"


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory, model_dirs, text_file):
    path = tmp_path_factory.mktemp("good") / "good.h5"
    record_tiny(path, model_dirs["opt"], [text_file])
    return path


def test_missing_model_path(tmp_path, text_file):
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", tmp_path / "nope", "--data", text_file, "--out", out, *SMALL)
    assert_one_line_error(r, "model path not found", "nope")
    assert_not_complete(out)


@pytest.mark.parametrize("config, needles", [
    (lambda: tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4, vocab_size=300),
     ("cannot record 'mixtral'", "mixture of experts")),
    (lambda: tf.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=300),
     ("cannot record 'mamba'", "no FFN output projection")),
])
def test_unlocatable_architecture_is_refused_before_loading(tmp_path, text_file, config, needles):
    model_dir = tmp_path / "model"
    config().save_pretrained(model_dir)  # a config and no weights: refused from the config alone
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", model_dir, "--data", text_file, "--out", out, *SMALL)
    assert_one_line_error(r, *needles)
    assert_not_complete(out)


def test_hub_id_not_in_local_cache(tmp_path, text_file):
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", "nobody-here/no-such-model", "--data", text_file, "--out", out, *SMALL,
                env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(r, "not in the local Hugging Face cache", "nobody-here/no-such-model")
    assert_not_complete(out)


@pytest.mark.parametrize("content, needle", [(b"", "no text"), (b"   \n\n  ", "no text"),
                                             (b"\x00\x01\x02binary\x00" * 100, "looks binary")])
def test_empty_or_binary_data(tmp_path, model_dirs, content, needle):
    data = tmp_path / "data.bin"
    data.write_bytes(content)
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", model_dirs["opt"], "--data", data, "--out", out, *SMALL)
    assert_one_line_error(r, needle)
    assert_not_complete(out)


def test_tokens_smaller_than_one_sequence(tmp_path, model_dirs, text_file):
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", out,
                "--tokens", "10", "--seq-len", "32", "--quiet")
    assert_one_line_error(r, "smaller than one sequence")
    # and when the sequence length is the model's default, found only after loading it
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", out, "--tokens", "10", "--quiet")
    assert_one_line_error(r, "smaller than one sequence of 64 tokens")
    assert_not_complete(out)


def test_unwritable_output(tmp_path, model_dirs, text_file):
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", "/proc/ffnscope.h5", *SMALL)
    assert_one_line_error(r, "cannot write")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", blocker / "c.h5", *SMALL)
    assert_one_line_error(r, "does not exist")


def test_existing_output_needs_resume_or_force(tmp_path, model_dirs, text_file, good_cache):
    out = tmp_path / "c.h5"
    out.write_bytes(good_cache.read_bytes())
    before = out.read_bytes()
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", out, *SMALL)
    assert_one_line_error(r, "exists", "--resume", "--force")
    assert out.read_bytes() == before
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", out, *SMALL, "--force")
    assert r.returncode == 0, r.stderr


def _truncated(tmp_path, good_cache):
    path = tmp_path / "truncated.h5"
    data = good_cache.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _foreign(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(10)
    return path


@pytest.mark.parametrize("kind", ["truncated", "foreign", "text"])
def test_bad_cache_files(tmp_path, good_cache, model_dirs, text_file, kind):
    if kind == "truncated":
        bad, needle = _truncated(tmp_path, good_cache), "truncated or foreign"
    elif kind == "foreign":
        bad, needle = _foreign(tmp_path), "not an ffnscope recording"
    else:
        bad, needle = tmp_path / "notes.h5", "truncated or foreign"
        bad.write_text("hello")
    assert_one_line_error(run_cli("info", bad), needle, bad.name)
    assert_one_line_error(run_cli("merge", bad, good_cache, "--out", tmp_path / "m.h5"), needle)
    assert not (tmp_path / "m.h5").exists()
    before = bad.read_bytes()
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", bad, *SMALL, "--resume")
    assert_one_line_error(r, needle)
    assert bad.read_bytes() == before  # never touched


def test_resume_with_other_settings_is_refused(tmp_path, good_cache, model_dirs, text_file):
    out = tmp_path / "c.h5"
    out.write_bytes(good_cache.read_bytes())
    with h5py.File(out, "a") as f:
        f.attrs["status"] = "partial"
    r = run_cli("record", "--model", model_dirs["gpt2"], "--data", text_file, "--out", out, *SMALL, "--resume")
    assert_one_line_error(r, "another model")


def test_missing_cache_for_info(tmp_path):
    assert_one_line_error(run_cli("info", tmp_path / "none.h5"), "cache not found")


def test_non_utf8_text_is_reported_once(tmp_path, model_dirs):
    data = tmp_path / "latin1.txt"
    data.write_bytes(("caf\xe9 na\xefve r\xe9sum\xe9 " * 200).encode("latin-1"))
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", model_dirs["opt"], "--data", data, "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("UTF-8") == 1, r.stderr
    assert read_state(out, "testing").status == "complete"


def test_second_job_on_the_same_output_is_refused(tmp_path, model_dirs, text_file):
    import json
    import os

    out = tmp_path / "c.h5"
    progress = tmp_path / "c.h5.progress.json"
    progress.write_text(json.dumps({"pid": os.getppid(), "status": "running"}))  # a live process
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", out, *SMALL)
    assert_one_line_error(r, "another ffnscope job", str(os.getppid()))
    progress.write_text(json.dumps({"pid": 2**22 + 12345, "status": "running"}))  # long gone
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr


def test_gguf_refused_from_its_metadata(tmp_path, text_file):
    """A .gguf of an architecture the locator cannot read is refused from its header: this file holds
    the metadata of a mixture-of-experts model and a single tensor, so any attempt to load (dequantize)
    its weights would fail with another error."""
    import gguf
    import numpy as np

    path = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(2), w.add_context_length(64), w.add_embedding_length(32), w.add_feed_forward_length(64)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_expert_count(4), w.add_expert_used_count(2)
    w.add_expert_feed_forward_length(32), w.add_layer_norm_rms_eps(1e-6), w.add_rope_freq_base(10000.0)
    w.add_tensor("token_embd.weight", np.zeros((10, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = tmp_path / "c.h5"
    r = run_cli("record", "--model", path, "--data", text_file, "--out", out, *SMALL)
    assert_one_line_error(r, "cannot record 'qwen2_moe'", "mixture of experts")
    assert_not_complete(out)
