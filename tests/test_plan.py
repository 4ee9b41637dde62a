"""The memory plan's arithmetic with the sizes of models no test machine holds (engine.model.plan is pure
given sizes, the device kind and its free bytes): OPT-66b on an H200, as measured, and Llama-7B."""
import pytest

from ffnscope.cache.errors import UserError
from ffnscope.engine.model.plan import (SAMPLE_BYTES, RecordSizes, WeightSizes, device_weight_bytes,
                                        device_workspace, host_other_bytes, host_weight_bytes, kept_pairs_bytes,
                                        pinned_blocks, plan)

GiB = 1 << 30
H200_FREE = 139 * GiB


def weights(n_layers, d, vocab, layer_tensors, base_params, head_params, from_files):
    """16-bit weights; layer_tensors: the elements of each tensor of a decoder layer (its pinned reads)."""
    per_layer, base, head = sum(layer_tensors) * 2, base_params * 2, head_params * 2
    fixed = base + (head or vocab * d * 2)  # a tied head: state_dict names the embeddings twice
    return WeightSizes(n_layers=n_layers, per_layer=per_layer, base=base, fixed=fixed, head=head,
                       total=fixed + n_layers * per_layer, from_files=from_files,
                       pinned_layer=pinned_blocks([[n * 2 for n in layer_tensors]]))


def opt_layer(d=9216, f=36864):
    """q, k, v, out (weight, bias), fc1, fc2 (weight, bias), two layer norms (weight, bias)."""
    return [d * d, d] * 4 + [f * d, f, d * f, d] + [d] * 4


def llama_layer(d, f, kv):
    """q, k, v, o, gate, up, down, two RMS norms; kv: the width of k and v (grouped-query attention)."""
    return [d * d, kv * d, kv * d, d * d, f * d, f * d, d * f, d, d]


def opt_66b(from_files=False):
    d, vocab = 9216, 50272
    return weights(64, d, vocab, opt_layer(), vocab * d + 2050 * d + 2 * d, 0, from_files)  # tied head


def llama_7b(from_files=True):
    d, f, vocab = 4096, 11008, 32000
    return weights(32, d, vocab, llama_layer(d, f, d), vocab * d + d, vocab * d, from_files)


def llama_70b(from_files=True):
    d, f, vocab = 8192, 28672, 128256
    return weights(80, d, vocab, llama_layer(d, f, 1024), vocab * d + d, vocab * d, from_files)


def run(d_model, d_ffn, heads, layers, batch_tokens=8192, shard_tokens=262144):
    return RecordSizes(d_model=d_model, d_ffn=d_ffn, seq_len=2048, recorded_layers=layers, topk=16, samples=2048,
                       batch_tokens=batch_tokens, shard_tokens=shard_tokens, heads=heads, hidden_itemsize=2)


# the measured run: OPT-66b loaded whole, --batch-tokens 16384, --shard-tokens 1000000, --host-memory 200GiB
OPT_RUN = run(9216, 36864, 72, 64, batch_tokens=16384, shard_tokens=1_000_000)


def test_the_measured_opt_66b_figure_is_the_cpu_arithmetic():
    """Charging every weight and the CPU's attention workspace to the host gave 9.7 GB for an 18.4 GB shard,
    with float16 samples and pos_fire rewritten whole: float32 samples (cache.state.Samples) charge 2 bytes
    more per value, held and copied, and pos_fire's increments (cache.state.PosIncrements) 2 bytes a count."""
    wider = 2 * OPT_RUN.samples * 64 * 36864 * (SAMPLE_BYTES - 2)
    increments = (64 + 1) * OPT_RUN.seq_len * 36864 * 2
    cpu = plan(opt_66b(), OPT_RUN, "cpu", 1 << 50, 200 * GiB + wider + increments)
    assert round(OPT_RUN.shard_hidden_bytes / 1e9, 1) == 18.4
    assert round(cpu.hidden_bytes / 1e9, 1) == 9.7


@pytest.mark.parametrize("from_files", [False, True])
def test_on_a_gpu_the_opt_66b_shard_fits_the_host(from_files):
    w = opt_66b(from_files)
    gpu = plan(w, OPT_RUN, "cuda", None, 200 * GiB, free=H200_FREE)
    assert 0 < gpu.resident < 64
    assert gpu.hidden_bytes >= OPT_RUN.shard_hidden_bytes  # no spill to disk
    assert gpu.device_weight_bytes <= H200_FREE
    # the host holds no weight that is on the GPU, and no attention workspace; read per layer, one layer's
    # pinned copies (tests/test_pinned_plan.py: as the allocator rounds them)
    streamed = 64 - gpu.resident
    held = w.pinned_layer if from_files else w.per_layer * streamed
    assert host_weight_bytes(w, "cuda", gpu.resident) == held
    assert gpu.host_bytes == held + host_other_bytes(OPT_RUN, "cuda")
    assert host_other_bytes(OPT_RUN, "cpu") - host_other_bytes(OPT_RUN, "cuda") > 30e9  # the CPU's score matrices


def test_all_resident_gpu_holds_no_weights_on_the_host_but_an_untied_head():
    w = llama_7b(from_files=False)
    gpu = plan(w, run(4096, 11008, 32, 32), "cuda", None, None, free=H200_FREE)
    assert gpu.resident == 32 and host_weight_bytes(w, "cuda", 32) == w.head == 32000 * 4096 * 2
    assert gpu.hidden_bytes == 1 << 62  # no host budget: no cap


def test_device_memory_above_the_free_memory_is_refused_in_one_line():
    with pytest.raises(UserError) as error:
        plan(llama_7b(), run(4096, 11008, 32, 32), "cuda", 200 * GiB, None, free=H200_FREE)
    message = str(error.value)
    assert "--device-memory" in message and "139.0 GiB free" in message and "\n" not in message
    # at or under the free memory it is the weights' budget: 4 layers' worth keeps 2 resident and two slots
    # (the streamed layer computing and the next one arriving: LayerRunner's prefetch)
    w = llama_7b()
    four = plan(w, run(4096, 11008, 32, 32), "cuda", w.base + 4 * w.per_layer, None, free=H200_FREE, prefetch=True)
    assert four.resident == 2 and four.device_weight_bytes == device_weight_bytes(w, 2, 2) == w.base + 4 * w.per_layer
    with pytest.raises(UserError, match="2 layers"):  # one slot is not room enough to stream on a GPU
        plan(w, run(4096, 11008, 32, 32), "cuda", w.base + w.per_layer, None, free=H200_FREE, prefetch=True)
    # without a prefetch (NPL's passes) one slot: 3 resident
    assert plan(w, run(4096, 11008, 32, 32), "cuda", w.base + 4 * w.per_layer, None, free=H200_FREE).resident == 3


def test_the_plan_says_when_the_shard_hidden_states_fit_on_the_gpu():
    w, r = llama_7b(), run(4096, 11008, 32, 32)
    assert plan(w, r, "cuda", None, None, free=H200_FREE).hidden_on_device  # 13.5 GB of weights, 2 GB shard
    # a weight budget of 4 layers leaves the shard no room beside them
    assert not plan(w, r, "cuda", w.base + 4 * w.per_layer, None, free=H200_FREE).hidden_on_device
    # the whole budget asked, but the GPU too full for the shard beside all the layers
    full = w.base + 32 * w.per_layer + device_workspace(r.batch_tokens, r.d_model, r.d_ffn) + r.shard_hidden_bytes \
        + kept_pairs_bytes(r, "cuda")
    short = plan(w, r, "cuda", None, None, free=int((full - 1000) / 0.9))
    assert short.resident == 32 and not short.hidden_on_device
    assert plan(w, r, "cuda", None, None, free=int((full + 1000) / 0.9)).hidden_on_device
    assert not plan(w, r, "cpu", None, None).hidden_on_device  # the CPU's host is its device: nothing to say


def test_the_cpu_plan_still_charges_the_host_for_everything():
    w = opt_66b(from_files=True)
    r = run(9216, 36864, 72, 64)
    cpu = plan(w, r, "cpu", w.base + 2 * w.per_layer, 200 * GiB, prefetch=True)
    assert cpu.resident == 1
    # the resident layer, the streamed one computing and the next one being read meanwhile (the prefetch)
    assert cpu.host_bytes == w.fixed + 3 * w.per_layer + host_other_bytes(r, "cpu")
    with pytest.raises(UserError, match="keep fewer layers in memory"):
        plan(w, r, "cpu", w.base + 2 * w.per_layer, cpu.host_bytes, prefetch=True)
    # without a prefetch (NPL's passes) the layer being read is the only one in flight
    assert plan(w, r, "cpu", w.base + 2 * w.per_layer, 200 * GiB).host_bytes == cpu.host_bytes - w.per_layer
