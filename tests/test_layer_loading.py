"""Decoder layers read from the safetensors files when they run (engine.model.weights) change no number,
and no layer is in memory before its turn."""
import pytest
import torch

import ffnscope.engine.record.job
from ffnscope.engine.model.load import load_model
from ffnscope.engine.model.plan import host_fixed_bytes, layer_sizes, plan_device, plan_memory, weight_sizes
from ffnscope.engine.model.runner import LayerRunner
from ffnscope.engine.model.weights import LayerWeights
from tests.helpers import assert_same_cache, record_tiny
from tests.tiny_models import build, save


def _record_with(monkeypatch, out, model_dir, text_file, per_layer: bool, **options):
    real = ffnscope.engine.model.load.load_model
    monkeypatch.setattr(ffnscope.engine.record.job, "load_model",
                        lambda *a, **k: real(*a, **k, per_layer=per_layer))
    return record_tiny(out, model_dir, [text_file], **options)


@pytest.mark.parametrize("streamed", [False, True])
def test_per_layer_recording_equals_all_in_memory(model_dirs, text_file, tmp_path, monkeypatch, streamed):
    model_dir = model_dirs["llama"]
    options = {}
    if streamed:  # device budget of one layer: every layer read from the files at its turn
        fixed, per_layer = layer_sizes(load_model(str(model_dir)))
        options["device_memory"] = fixed + per_layer
    whole = _record_with(monkeypatch, tmp_path / "whole.h5", model_dir, text_file, False, **options)
    files = _record_with(monkeypatch, tmp_path / "files.h5", model_dir, text_file, True, **options)
    assert files.meta["recording"]["resident_layers"] == (0 if streamed else 4)
    assert files.meta["model"]["fingerprint"] == whole.meta["model"]["fingerprint"]
    assert_same_cache(tmp_path / "whole.h5", tmp_path / "files.h5")


def test_no_layer_is_in_memory_before_its_turn(model_dirs, monkeypatch):
    lm = load_model(str(model_dirs["llama"]))
    assert isinstance(lm.weights, LayerWeights)
    assert not lm.model.get_input_embeddings().weight.is_meta  # the non-layer weights are loaded once
    assert all(p.is_meta for layer in lm.adapter.layers for p in layer.parameters())
    reads = []
    real_read = LayerWeights.read

    def read(self, index, device="cpu"):
        reads.append(index)
        assert all(p.is_meta for layer in list(self.layers)[1:] for p in layer.parameters())  # 0 is resident
        return real_read(self, index, device)

    monkeypatch.setattr(LayerWeights, "read", read)
    runner = LayerRunner(lm.adapter, torch.device("cpu"), resident=1)
    assert reads == [0] and lm.weights.is_loaded(0)  # the resident layer, read once and kept
    hidden = runner.embed(torch.randint(0, 250, (2, 16)))
    for index in range(len(runner.layers)):
        assert reads == list(range(index + (index == 0)))  # layer i is read at its turn, not before
        hidden = runner.run(index, hidden, runner.weights(index))
    assert reads == [0, 1, 2, 3]
    assert not any(lm.weights.is_loaded(i) for i in (1, 2, 3))  # streamed layers never land in the model


def test_a_direct_model_call_borrows_each_layer(model_dirs):
    lazy, whole = load_model(str(model_dirs["gpt2"])), load_model(str(model_dirs["gpt2"]), per_layer=False)
    ids = torch.randint(0, 250, (2, 16))
    assert torch.equal(lazy.model(input_ids=ids).logits, whole.model(input_ids=ids).logits)
    assert not any(lazy.weights.is_loaded(i) for i in range(4))  # given back after the call
    assert torch.equal(lazy.adapter.w_out(2), whole.adapter.w_out(2))  # read from the files alone


def test_bf16_cast_is_the_same_as_from_pretrained(model_dirs):
    lazy = load_model(str(model_dirs["gemma2"]), "bfloat16")
    whole = load_model(str(model_dirs["gemma2"]), "bfloat16", per_layer=False)
    LayerRunner(lazy.adapter, torch.device("cpu"), resident=4)
    for (key, a), (_, b) in zip(lazy.model.state_dict().items(), whole.model.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), key


def test_pickle_weights_convert_once_to_safetensors(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model = build("llama", 2, seed=1)
    directory = save(model, tmp_path / "pickled")
    save(model, tmp_path / "ref")
    for f in directory.glob("*.safetensors"):
        torch.save(load_file(f), directory / "pytorch_model.bin")
        f.unlink()
    lm = load_model(str(directory), allow_pickle=True)
    assert not list(directory.glob("*.safetensors")) and list(directory.glob("*.bin"))
    assert lm.weights is not None and all(f.parent.name.startswith("pickled-") for f in lm.weights.files.values())
    ids = torch.randint(0, 250, (1, 8))
    assert torch.equal(lm.model(input_ids=ids).logits, load_model(str(tmp_path / "ref")).model(input_ids=ids).logits)


def test_host_plan_charges_the_weights_held(model_dirs, text_file, tmp_path):
    state = record_tiny(tmp_path / "c.h5", model_dirs["llama"], [text_file])
    lazy, whole = load_model(str(model_dirs["llama"])), load_model(str(model_dirs["llama"]), per_layer=False)
    fixed, per_layer = layer_sizes(lazy)
    assert plan_device(fixed + per_layer, lazy, torch.device("cpu"), 64) == 0
    streamed = host_fixed_bytes(lazy, state.meta)
    # 4 layers held vs 2 in flight: the one computing and the next one read meanwhile (the prefetch)
    assert host_fixed_bytes(whole, state.meta) - streamed == 2 * per_layer
    # the CPU with only a host budget: as many resident layers as leave room for a shard's hidden states
    hidden = state.meta["recording"]["shard_tokens"] * state.meta["model"]["d_model"] * 4
    resident, room = plan_memory(None, streamed + hidden, lazy, state.meta, torch.device("cpu"), 64)
    assert resident == 0 and room >= hidden
    resident, _ = plan_memory(None, streamed + hidden + 2 * per_layer, lazy, state.meta, torch.device("cpu"), 64)
    assert resident == 2


def test_weight_sizes_keep_only_an_untied_head_on_the_host_of_a_gpu(model_dirs):
    """The head a GPU plan leaves in host memory: an untied LM head (llama here), nothing for a tied one."""
    untied, tied = load_model(str(model_dirs["llama"])), load_model(str(model_dirs["opt"]))
    head = untied.model.get_output_embeddings().weight
    assert weight_sizes(untied).head == head.numel() * head.element_size()
    assert weight_sizes(tied).head == 0 and weight_sizes(tied).fixed == layer_sizes(tied)[0]
