"""The model fingerprint covers every weight: parts of two models that differ in one FFN weight do not
merge, and a cache holding an older ffnscope's fingerprint is refused with the fix (issue 18, 8)."""
import json

import h5py
import pytest
import torch

from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import merge
from tests.fixtures.parts import synthetic_parts
from tests.helpers import record_tiny
from tests.test_errors import assert_one_line_error, run_cli
from tests.tiny_models import build, save


def _one_ffn_weight_changed(model):
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 0.25


def test_parts_of_models_differing_in_one_ffn_weight_do_not_merge(tmp_path, text_file):
    model = build("llama", 2)
    save(model, tmp_path / "a")
    _one_ffn_weight_changed(model)
    save(model, tmp_path / "b")
    record_tiny(tmp_path / "p1.h5", tmp_path / "a", [text_file], part=(1, 2))
    record_tiny(tmp_path / "p2.h5", tmp_path / "b", [text_file], part=(2, 2))
    r = run_cli("merge", tmp_path / "p1.h5", tmp_path / "p2.h5", "--out", tmp_path / "m.h5")
    assert_one_line_error(r, "another model", "merge only parts of one recording")
    assert not (tmp_path / "m.h5").exists()


def test_a_model_only_in_memory_is_fingerprinted_from_every_weight():
    from ffnscope.engine.model.fingerprint import model_fingerprint

    model = build("llama", 2)
    before = model_fingerprint(model)
    assert model_fingerprint(build("llama", 2)) == before
    _one_ffn_weight_changed(model)
    assert model_fingerprint(model) != before


def test_a_part_with_an_older_fingerprint_is_refused_with_the_fix(tmp_path):
    """Older caches hold a fingerprint of the config and 8 embedding rows: beside a current one it cannot
    say whether the models are the same, and the merge says so and what to do."""
    parts = synthetic_parts(tmp_path, 2)
    with h5py.File(parts[1], "a") as f:
        meta = json.loads(f.attrs["meta"])
        meta["model"]["fingerprint"] = "w2-0123456789abcdef"
        f.attrs["meta"] = json.dumps(meta)
    with pytest.raises(UserError, match="another ffnscope version .* record the older parts again with this "
                                        "version, or merge with the version that recorded them"):
        merge(parts, tmp_path / "m.h5")


def test_resuming_a_cache_with_an_older_fingerprint_is_refused_with_the_fix(tmp_path, model_dirs, text_file):
    out = tmp_path / "c.h5"
    record_tiny(out, model_dirs["opt"], [text_file], tokens=256)
    with h5py.File(out, "a") as f:
        meta = json.loads(f.attrs["meta"])
        meta["model"]["fingerprint"] = "0123456789abcdef"  # as ffnscope wrote it before
        f.attrs["meta"] = json.dumps(meta)
        f.attrs["status"] = "partial"
    r = run_cli("record", "--model", model_dirs["opt"], "--data", text_file, "--out", out, "--tokens", "256",
                "--seq-len", "32", "--device", "cpu", "--quiet", "--resume")
    assert_one_line_error(r, "older ffnscope", "finish it with that version, or --force to record it again")
