"""The GPU code path, run on the CPU (tests/fake_cuda.py): with the device set to cuda, every architecture the
sweep records (tests/arch_sweep.py) is recorded by the record job, from the skeleton and its safetensors files
(one layer resident, the other streamed), and a representative set loaded whole (the streamed layer copied
from host memory) and through NPL's fit, substitution (explicit-only and the finer-grained grid too) and
functional neurons. Any operation that mixes devices fails there as it would on a GPU; values are not
checked (fake tensors hold none: the CPU tests check them). Last, a CPU test with real values: explicit-only
substitution with streamed layers equals all-resident."""
import dataclasses
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

import ffnscope.engine.npl.plan as npl_plan
import ffnscope.engine.record.block as block
import ffnscope.engine.record.job as record_job
from ffnscope.engine.model import accelerator
from ffnscope.engine.model.load import load_model
from ffnscope.engine.npl.job import (NplFitConfig, NplFunctionalConfig, NplSubstituteConfig, fit_job, functional_job,
                                     substitute_job)
from tests.arch_sweep import build, causal_lm_types, documented_passing
from tests.fake_cuda import FakeRuntime, Unavailable, fake_cuda, register_cuda_guard
from tests.helpers import record_tiny
from tests.tiny_models import save, tiny_model_dir

SWEEP = sorted(documented_passing()[1] & set(causal_lm_types()))  # what the sweep records, in this transformers
# NPL and a model loaded whole: the README's families, the two with a causal-mask buffer (gpt_neo, openai-gpt),
# and falcon and phi (parallel attention and FFN)
REPRESENTATIVE = ("llama", "gpt2", "opt", "gpt_neo", "openai-gpt", "gemma2", "gptj", "phi", "falcon")
HIDDEN = ("device", "pinned", "file", "memory")  # where a shard's hidden states go, in turn
RECORD = dict(device="cuda", seq_len=16, tokens=128, shard_tokens=64, batch_tokens=32, calib_tokens=64,
              samples=8, force=True)
QUIET = dict(log=lambda _m: None)


@pytest.fixture(scope="module")
def fake():
    try:
        register_cuda_guard()
    except Unavailable as why:
        if os.environ.get("CI"):  # CI has a compiler (scripts/setup.sh's machine): there the GPU path must run
            pytest.fail(str(why))
        pytest.skip(str(why))


@pytest.fixture(scope="module")
def sweep_dirs(tmp_path_factory):
    """model_type -> the sweep's tiny model saved as a model directory (built on first use)."""
    base, made = tmp_path_factory.mktemp("fake-cuda-models"), {}

    def directory(model_type):
        if model_type not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                made[model_type] = save(build(model_type), base / model_type)
        return made[model_type]
    return directory


def _one_resident(monkeypatch, hidden: str = "device") -> None:
    """Recordings and NPL passes keep one layer resident and stream the other (the sweep's models have two: a
    GPU plan with its two streaming slots keeps all or none); a recording's hidden states go where `hidden`
    says (engine.model.plan.hidden_placement: device, pinned, memory or file)."""
    plan = record_job.plan_memory
    monkeypatch.setattr(record_job, "plan_memory", lambda *a, **k: dataclasses.replace(plan(*a, **k), resident=1))
    monkeypatch.setattr(block, "hidden_placement", lambda *_a, **_k: hidden)
    monkeypatch.setattr(npl_plan, "runner_resident", lambda *_a, **_k: 1)


def _record(lm, directory, text_file, out, monkeypatch, **options):
    """`ffnscope record --device cuda` of `lm` (given the job in place of loading it)."""
    monkeypatch.setattr(record_job, "load_model", lambda *_a, **_k: lm)
    state = record_tiny(out, directory, [text_file], **{**RECORD, **options})
    assert state.meta["recording"]["resident_layers"] == 1
    return state


def test_fake_cuda_fails_where_a_gpu_fails(fake):
    with fake_cuda() as runtime:
        assert accelerator.runtime is runtime and accelerator.free_bytes(torch.device("cuda")) == runtime.free
        x = torch.ones(4, 3, device="cuda")
        assert (x[1:] @ torch.ones(3, 2).to("cuda")).device.type == "cuda"
        with pytest.raises(FakeTensorDeviceMismatchError):
            x + torch.ones(4, 3)
        skeleton = torch.nn.Linear(3, 2, device="meta")  # a layer whose weights are still in the files
        with pytest.raises(FakeTensorDeviceMismatchError):
            x @ skeleton.weight.T
        with pytest.raises(NotImplementedError, match="meta tensor"):
            skeleton.to("cuda")
        with pytest.raises(TypeError, match="cuda:0 device type tensor to numpy"):
            x.numpy()
        assert x.cpu().numpy().shape == (4, 3)
        with pytest.raises(AssertionError, match="never recorded"):
            runtime.current_stream("cuda").wait_event(runtime.event())
        with pytest.raises(AssertionError, match="record_stream of a cpu tensor"):
            runtime.record_stream(torch.ones(2), runtime.stream("cuda"))
    assert not isinstance(accelerator.runtime, FakeRuntime)


def test_the_cuda_runtime_is_called_through_the_accelerator_only():
    """What a CPU-only torch cannot run (streams, events, pinned memory, device queries) goes through
    engine.model.accelerator, which the fake runtime replaces: nothing else in the engine calls CUDA."""
    engine = Path(accelerator.__file__).parent.parent
    direct = re.compile(r"torch\.cuda|pin_memory|(?<!runtime)\.record_stream\(|torch\.(Stream|Event)\b")
    found = [f"{path.relative_to(engine)}:{n}" for path in sorted(engine.rglob("*.py")) if path.name != "accelerator.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if direct.search(line)]
    assert not found, found


@pytest.mark.parametrize("model_type", SWEEP)
def test_recording_on_cuda(model_type, fake, sweep_dirs, text_file, tmp_path, monkeypatch):
    """The skeleton's static weights, the resident layer read into it, the streamed one read into pinned memory
    and copied on the side stream, the hooks, every statistic's kernel and its host copy; the shard's hidden
    states in each of their places in turn (on the device, else moved batch by batch on the copy stream), and
    for every other architecture a relative firing rule's calibration (ActScale)."""
    directory = sweep_dirs(model_type)
    lm = load_model(str(directory))
    assert lm.weights is not None
    number = SWEEP.index(model_type)
    hidden = HIDDEN[number % len(HIDDEN)]
    _one_resident(monkeypatch, hidden)
    with fake_cuda() as runtime:
        _record(lm, directory, text_file, tmp_path / "c.h5", monkeypatch,
                tau_rule="quantile:0.9" if number % 2 else "absolute")
    assert runtime.calls.get("pinned_empty") and runtime.calls.get("record_stream")  # the streamed layer
    assert (runtime.calls.get("stream", 0) > 1) is (hidden != "device")  # the runner's; a copy stream a pass


@pytest.mark.parametrize("model_type", ["gpt_neo", "openai-gpt", "moshi", "llama", "gpt2"])
def test_recording_on_cuda_of_a_model_loaded_whole(model_type, fake, sweep_dirs, text_file, tmp_path, monkeypatch):
    """The streamed layer copied from host memory (its state_dict, and the buffers that leaves out)."""
    directory = sweep_dirs(model_type)
    lm = load_model(str(directory), per_layer=False)
    assert lm.weights is None
    _one_resident(monkeypatch)
    with fake_cuda() as runtime:
        _record(lm, directory, text_file, tmp_path / "c.h5", monkeypatch)
    assert runtime.calls.get("record_stream")


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_npl_on_cuda(model_type, fake, sweep_dirs, text_file, tmp_path, monkeypatch):
    """fit (both methods; forward, backward and self pairs), substitution with every mapping, explicit-only and
    the finer-grained grid, functional neurons: each with one layer resident and the other streamed."""
    directory = sweep_dirs(model_type)
    lm = load_model(str(directory))
    monkeypatch.setattr("ffnscope.engine.model.load.load_model", lambda *_a, **_k: lm)  # the NPL jobs' load
    _one_resident(monkeypatch)
    cache = tmp_path / "c.h5"
    model = dict(device="cuda:0", batch_tokens=32)  # a GPU named by its index: the recording makes it current
    with fake_cuda() as runtime:
        # both calibration passes: a relative rule's thresholds, the n-gram skips
        _record(lm, directory, text_file, cache, monkeypatch, device="cuda:0", tau_rule="quantile:0.9",
                ngram_max_freq=0.5)
        fit_job(NplFitConfig(cache, pairs="adjacent,1:1,1:0", tokens=256, method="both", force=True, **model),
                **QUIET)
        substitute_job(NplSubstituteConfig(cache, seeds=1, explicit=True, finegrained=True, fine_metrics=("l2",),
                                           **model), **QUIET)
        functional_job(NplFunctionalConfig(cache, **model), **QUIET)
    assert runtime.calls.get("set_device") == 1 and runtime.calls.get("record_stream")


# --- with real values, on the CPU ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_explicit_only_substitution_with_streamed_layers_equals_all_resident(family, tmp_path, monkeypatch):
    """The explicit-only deltas are FFN_k(replacement) - FFN_k(g_k), Gemma-2's post-FFN norm included: a streamed
    layer's weights (that norm's too) are there only during its call."""
    from ffnscope.engine.npl.substitute import run_settings, table1_rows, table1_settings

    directory = tiny_model_dir(tmp_path / family, family)
    tokens = np.random.default_rng(0).integers(0, 256, size=(4, 16))
    settings = table1_settings(4, None, [2, 4], ("zero", "random"), seeds=1, random_scale="unit")
    rows = {}
    for resident in (4, 1):
        monkeypatch.setattr(npl_plan, "runner_resident", lambda *_a, resident=resident, **_k: resident)
        lm = load_model(str(directory))  # its layers in the files: a resident run keeps them loaded
        result = run_settings(lm, tokens, settings, "cpu", batch_tokens=32, explicit=True)
        rows[resident] = [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in table1_rows(result)]
    assert rows[1] == rows[4]
    assert all(np.isfinite(row["explicit"]) for row in rows[1])
