"""The architecture sweep's checks (tests/arch_sweep.py, tests/reference.py) fail on planted bugs: a
wrongly located site, each recorded statistic, each way of recording, the located W_out and the
zeroing check, runtime refusals and errors, and a documented outcome that changed."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

import ffnscope.engine.model.hooks as hooks
import ffnscope.engine.model.sites as sites
from ffnscope.engine.model.runner import LayerRunner
from ffnscope.engine.model.weights import LayerWeights
from tests import arch_sweep
from tests.arch_sweep import Mismatch, build, check, check_site, compare, record_layers, reference, sweep_tokens
from tests.reference import NotFound, find_ffn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with arch_sweep._one_thread():  # as the sweep runs
        yield


def _plant_layout(monkeypatch, **changes):
    """The locator returns its layout with `changes` (for the in-memory and the files recording alike)."""
    real = sites.locate
    monkeypatch.setattr(sites, "locate", lambda model: dataclasses.replace(real(model), **changes))


def _no_role_check(monkeypatch):
    def skip(self):
        self.checked, self._up = True, None
    monkeypatch.setattr(hooks.FFNProbe, "_check", skip)


# --- a wrongly located site -------------------------------------------------------------------------
def test_the_attention_projection_taken_for_the_ffn_fails(monkeypatch):
    """GPT-2 with the locator pointing at the attention's output projection and no activation module: the
    role check has nothing to compare and the recording agrees with the located module (all the old
    sweep compared), but the reference finds the real FFN."""
    _plant_layout(monkeypatch, mlp="attn", down="c_proj", act=None, d_ffn=arch_sweep.WIDTH)
    model = build("gpt2")
    adapter = sites.Adapter(model)
    tokens = sweep_tokens()
    recording = record_layers(adapter, tokens, resident=2, fused=False)
    located = []
    for lo, hi in arch_sweep.batches(len(tokens)):
        with hooks.ffn_hooks(adapter, [0], g=lambda _k, t: located.append(t.reshape(-1, t.shape[-1]))), torch.no_grad():
            model(input_ids=torch.as_tensor(tokens[lo:hi]))
    g = torch.cat(located)
    assert np.array_equal(recording.layers[0].fire_count[0], (g > 0).sum(0).numpy())
    outcome = check("gpt2", files=False)
    assert outcome.status == "fails" and outcome.reason.startswith("located site"), outcome


def test_the_up_projection_taken_for_the_activation_fails(monkeypatch):
    """Llama with the locator reading act(gate) off the up projection, the role check switched off."""
    _no_role_check(monkeypatch)
    _plant_layout(monkeypatch, act="up_proj")
    outcome = check("llama", files=False)
    assert outcome.status == "fails" and outcome.reason.startswith("in memory: layer 0 fire_count"), outcome


def test_a_role_check_refusal_is_a_failure(monkeypatch):
    _plant_layout(monkeypatch, act="up_proj")
    outcome = check("llama", files=False)
    assert outcome.status == "fails", outcome
    assert outcome.reason.startswith("recording in memory: the input of its FFN output projection"), outcome


def test_a_runtime_error_is_a_failure_and_only_the_locator_refuses(monkeypatch):
    from ffnscope.engine.record.block import BlockRunner

    def broken(*_a, **_k):
        raise RuntimeError("planted")
    with monkeypatch.context() as m:
        m.setattr(BlockRunner, "run", broken)
        assert check("llama", files=False).reason == "recording in memory: RuntimeError: planted"
    monkeypatch.setattr(sites, "locate", lambda model: (_ for _ in ()).throw(sites.refuse("llama", "planted")))
    assert check("llama", files=False) == arch_sweep.Outcome("llama", "refused", "planted")


# --- each way of recording ----------------------------------------------------------------------------
def test_a_bug_reading_layers_from_the_files_fails_from_files(monkeypatch):
    real = LayerWeights.read

    def read(self, index, *args, **kwargs):
        weights = real(self, index, *args, **kwargs)
        name = next(k for k in weights if k.endswith("down_proj.weight"))
        weights[name] = weights[name] * 1.01
        return weights
    monkeypatch.setattr(LayerWeights, "read", read)
    assert check("llama", files=False).status == "passes"
    outcome = check("llama", files=True)
    assert outcome.status == "fails" and outcome.reason.startswith("from files: layer 1"), outcome


def test_a_bug_in_resident_layers_fails_in_memory(monkeypatch):
    real = LayerRunner.run

    def run(self, index, hidden, weights):
        out = real(self, index, hidden, weights)
        return out * 1.01 if weights is None else out  # resident layers only: the files recording streams
    monkeypatch.setattr(LayerRunner, "run", run)
    outcome = check("llama", files=True)
    assert outcome.status == "fails" and outcome.reason.startswith("in memory: layer 1"), outcome


def test_a_bug_in_the_fused_statistics_fails_from_files(monkeypatch):
    """The files recording runs the CPU's fused statistics (numba), the in-memory one torch's."""
    from ffnscope.engine.record.stats import LayerStats, cpu_kernels

    if cpu_kernels is None:
        pytest.skip("numba is not installed: both recordings run torch's statistics")
    real = LayerStats._update_fused

    def update(self, *args):
        out = real(self, *args)
        self.g_max += 1e-3
        return out
    monkeypatch.setattr(LayerStats, "_update_fused", update)
    outcome = check("llama", files=True)
    assert outcome == arch_sweep.Outcome("llama", "fails", "from files: layer 0 g_max differ from the reference")


# --- each statistic -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded():
    model = build("llama")
    tokens = sweep_tokens()
    recording = record_layers(sites.Adapter(model), tokens, resident=2, fused=False)
    return recording, reference(model, tokens)[1]


def _bump(a, index=0):
    flat = a.reshape(-1)
    if flat.dtype.kind == "f":
        flat[index] = np.nextafter(flat[index], np.float32(np.inf)) if flat.dtype == np.float32 else flat[index] * 1.001
    else:
        flat[index] += 1


PLANTS = {  # statistic named in the failure -> a bug in it
    "fire_count": lambda s: _bump(s.fire_count),
    "g_sum": lambda s: _bump(s.g_sum),
    "g_sumsq": lambda s: _bump(s.g_sumsq),
    "g_max": lambda s: _bump(s.g_max),
    "pos_fire": lambda s: _bump(s.pos_fire, s.pos_fire.shape[1] + 3),
    "topk_value": lambda s: _bump(s.topk_value),
    "topk_index": lambda s: s.topk_index.__setitem__((slice(0, 2), 0), s.topk_index[[1, 0], 0]),
    "topk_g": lambda s: _bump(s.topk_g),
    "start_value": lambda s: _bump(s.start_value),
    "start_index": lambda s: _bump(s.start_index),
    "start_g": lambda s: _bump(s.start_g),
    "1-gram counts": lambda s: _bump(s.ngrams[1].count),
    "1-gram g sums": lambda s: _bump(s.ngrams[1].g_sum),
    "2-gram grams": lambda s: _bump(s.ngrams[2].gram),
    "2-gram counts": lambda s: _bump(s.ngrams[2].count, 5),
    "3-gram neurons": lambda s: s.ngrams[3].__setattr__("neuron", (s.ngrams[3].neuron + 1) % 96),
    "3-gram counts": lambda s: _bump(s.ngrams[3].count, 7),
}


def test_the_unplanted_recording_matches(recorded):
    compare(*recorded)


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_each_statistic_is_compared(recorded, name):
    recording, refs = recorded
    planted = copy.deepcopy(recording)
    PLANTS[name](planted.layers[1])
    with pytest.raises(Mismatch, match=f"layer 1 {name} differ"):
        compare(planted, refs)


def test_samples_are_compared(recorded):
    recording, refs = recorded
    planted = copy.deepcopy(recording)
    _bump(planted.samples[0])
    with pytest.raises(Mismatch, match="layer 0 samples differ"):
        compare(planted, refs)
    planted = copy.deepcopy(recording)
    planted.sample_index = planted.sample_index + 1
    with pytest.raises(Mismatch, match="sample index differ"):
        compare(planted, refs)


# --- the located W_out and the zeroing check -------------------------------------------------------------
@pytest.fixture
def llama_site():
    model = build("llama")
    ids = torch.as_tensor(sweep_tokens()[:2])
    adapter = sites.Adapter(model)
    found = find_ffn(model, ids)
    check_site(model, adapter, found, ids)  # unplanted: passes
    return model, adapter, found, ids


def test_a_wrong_w_out_fails(llama_site, monkeypatch):
    model, adapter, found, ids = llama_site
    real = sites.Adapter.w_out
    monkeypatch.setattr(sites.Adapter, "w_out", lambda self, index: real(self, 1 - index))
    with pytest.raises(Mismatch, match="g @ W_out"):
        check_site(model, adapter, found, ids)


def test_a_located_g_that_is_not_the_neurons_fails_the_zeroing_check(llama_site, monkeypatch):
    model, adapter, found, ids = llama_site
    real = hooks.ffn_hooks

    def scaled(adapter, layers, **at):  # the located site hands over 1.5 g
        return real(adapter, layers, **{site: (lambda k, t, fn=fn: fn(k, 1.5 * t)) for site, fn in at.items()})
    monkeypatch.setattr(hooks, "ffn_hooks", scaled)
    with pytest.raises(Mismatch, match="zeroing neuron"):
        check_site(model, adapter, found, ids)


def test_the_zeroing_check_sees_another_neuron_zeroed(llama_site, monkeypatch):
    model, adapter, found, ids = llama_site
    real = arch_sweep._zero
    monkeypatch.setattr(arch_sweep, "_zero", lambda x, i: real(x, (i + 1) % x.shape[-1]))
    with pytest.raises(Mismatch, match="zeroing neuron"):
        check_site(model, adapter, found, ids)


def test_the_reference_does_not_guess_an_ffn_it_cannot_find():
    """BitNet normalizes act(gate) * up before its output projection: g is neither an activation's output
    nor act(gate) * up."""
    model = build("bitnet")
    with pytest.raises(NotFound, match="neither"):
        find_ffn(model, torch.as_tensor(sweep_tokens()[:2]))


# --- the documented list ---------------------------------------------------------------------------
DOC = """# Architectures

Generated by `python -m tests.arch_sweep --write` with transformers 9.9.9: every ...

## Supported: 2 architectures record exactly what the reference gives

| model_type | FFN |
| --- | --- |
| llama | Llama: gated FFN, silu |
| gone | Gone: plain FFN, relu |

## Located but not recorded exactly (refused at run time): 1

| model_type | reason |
| --- | --- |
| bitnet | the input of ... |

## Refused, with the reason ffnscope gives: 1

| model_type | reason |
| --- | --- |
| mixtral | its FFN is a mixture of experts |
"""


def test_the_documented_outcomes_are_read_and_compared():
    version, doc = arch_sweep.documented(DOC)
    assert version == "9.9.9"
    assert doc == {"llama": "passes", "gone": "passes", "bitnet": "fails", "mixtral": "refused"}
    now = {"llama": "passes", "bitnet": "fails", "mixtral": "refused", "new": "passes"}
    assert arch_sweep.compare_with_doc(doc, now) == ({}, ["new"], ["gone"])
    now["llama"] = "fails"
    assert arch_sweep.compare_with_doc(doc, now)[0] == {"llama": ("passes", "fails")}

