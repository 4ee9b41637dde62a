"""Streaming under a small device budget, or with hidden states on disk, changes no number."""
from ffnscope.engine.model.plan import host_fixed_bytes
from ffnscope.engine.model.runner import param_bytes
from ffnscope.engine.model.load import load_model
from tests.helpers import assert_same_cache, record_tiny


def test_one_layer_budget_equals_all_resident(model_dirs, text_file, tmp_path):
    model_dir = model_dirs["llama"]
    lm = load_model(str(model_dir))
    layers = list(lm.adapter.layers)
    fixed = param_bytes(lm.adapter.base) - sum(param_bytes(layer) for layer in layers)
    one_layer = fixed + max(param_bytes(layer) for layer in layers)

    resident = record_tiny(tmp_path / "resident.h5", model_dir, [text_file])
    streamed = record_tiny(tmp_path / "streamed.h5", model_dir, [text_file], device_memory=one_layer)
    assert resident.meta["recording"]["resident_layers"] == len(layers)
    assert streamed.meta["recording"]["resident_layers"] == 0
    assert_same_cache(tmp_path / "resident.h5", tmp_path / "streamed.h5", float_rtol=1e-6)


def test_hidden_states_on_disk_when_over_host_budget(model_dirs, text_file, tmp_path):
    model_dir = model_dirs["opt"]
    ram = record_tiny(tmp_path / "ram.h5", model_dir, [text_file])
    # room for weights and statistics but not for one shard of hidden states; every layer kept in memory
    # (--device-memory), else the CPU plan would stream layers from their files to make room instead
    tight = host_fixed_bytes(load_model(str(model_dir)), ram.meta) + 1000
    state = record_tiny(tmp_path / "disk.h5", model_dir, [text_file], host_memory=tight, device_memory=1 << 40)
    assert state.meta["recording"]["hidden_on_disk"]
    assert not list(tmp_path.glob(".*hidden"))  # the mapped file is gone afterwards
    assert_same_cache(tmp_path / "ram.h5", tmp_path / "disk.h5")


def test_nothing_runs_after_the_last_recorded_layer(model_dirs, text_file, tmp_path, monkeypatch):
    """--layers 0-1 of a 4-layer model: layers 2 and 3 and the LM head never run."""
    import ffnscope.engine.record.job

    lm = load_model(str(model_dirs["llama"]))
    calls = {"layer2": 0, "layer3": 0, "lm_head": 0}
    lm.adapter.layers[2].register_forward_hook(lambda *_: calls.__setitem__("layer2", calls["layer2"] + 1))
    lm.adapter.layers[3].register_forward_hook(lambda *_: calls.__setitem__("layer3", calls["layer3"] + 1))
    lm.model.lm_head.register_forward_hook(lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    monkeypatch.setattr(ffnscope.engine.record.job, "load_model", lambda *a, **k: lm)
    state = record_tiny(tmp_path / "c.h5", model_dirs["llama"], [text_file], layers="0-1")
    assert sorted(state.layers) == [0, 1]
    assert calls == {"layer2": 0, "layer3": 0, "lm_head": 0}


def test_calibration_reports_percent_rate_and_eta(model_dirs, text_file, tmp_path, monkeypatch):
    """The calibrating phase reports like the recording: percent up to 100, tokens/s and an ETA (its
    progress file is written at most every ProgressFile.interval from these updates)."""
    from ffnscope.engine.jobs.progress import ProgressFile

    seen, update = [], ProgressFile.update

    def spy(self, force=False, **fields):
        if fields.get("phase") == "calibrating":
            seen.append(fields)
        update(self, force, **fields)
    monkeypatch.setattr(ProgressFile, "update", spy)
    # a relative rule and n-gram layers: both calibration passes
    record_tiny(tmp_path / "c.h5", model_dirs["llama"], [text_file], tau_rule="quantile:0.9", ngram_max_freq=0.5)
    reports = [f for f in seen if "percent" in f]
    assert {f["calibration_passes"] for f in reports} == {2}
    percents = [f["percent"] for f in reports]
    assert percents == sorted(percents) and 0 < percents[0] < 100 and percents[-1] == 100.0
    assert all(f["tokens_per_s"] > 0 and f["eta_s"] is not None and f["tokens_total"] > 0 for f in reports)
