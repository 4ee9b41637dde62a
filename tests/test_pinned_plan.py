"""Pinned host memory is planned as torch's pinned-host caching allocator takes it (each block rounded up to a
power of two, and cached), the shard's hidden-state buffer is made once and reused, and what grows with the
recording's tokens is charged. Arithmetic at the sizes of OPT-66b and Llama-70B; no model is built."""
import math

import numpy as np
import pytest
import torch

from ffnscope.engine.model import accelerator
from ffnscope.engine.model.plan import (RecordSizes, hidden_seqs, host_other_bytes, host_token_bytes, pinned_blocks,
                                        pinned_bytes, plan)
from ffnscope.engine.record.block import BlockRunner
from tests.test_plan import GiB, llama_70b, llama_layer, opt_66b, opt_layer

H100_FREE = 79 * GiB


def allocator_block(nbytes: int) -> int:
    """The rounding rule, written independently of the plan: 2^ceil(log2(bytes))."""
    return 2 ** math.ceil(math.log2(nbytes))


def sizes(d_model, d_ffn, heads, layers, **more):
    return RecordSizes(d_model=d_model, d_ffn=d_ffn, seq_len=2048, recorded_layers=layers, topk=16, samples=2048,
                       batch_tokens=16384, shard_tokens=1_000_000, heads=heads, hidden_itemsize=2, **more)


def test_pinned_bytes_is_the_next_power_of_two():
    assert [pinned_bytes(n) for n in (0, 1, 3, 4096, 4097)] == [0, 1, 4, 4096, 8192]
    # per rounded size, the most blocks any one layer takes: a 3 KiB and a 4 KiB tensor share the 4 KiB size
    assert pinned_blocks([[3072, 100], [4096, 4096]]) == 2 * 4096 + 128


MODELS = {  # weights read per layer, their layer's tensors (16-bit), the run's sizes, --device-memory
    "opt-66b": (opt_66b(from_files=True), opt_layer(), sizes(9216, 36864, 72, 64), 60 * GiB),
    "llama-70b": (llama_70b(), llama_layer(8192, 28672, 1024), sizes(8192, 28672, 64, 80), None),
}


@pytest.mark.parametrize("name", MODELS)
def test_the_plan_locks_what_the_allocator_locks(name):
    w, layer, r, device_memory = MODELS[name]
    memory = plan(w, r, "cuda", device_memory, 200 * GiB, free=H100_FREE, prefetch=True)
    assert 0 < memory.resident < w.n_layers and memory.hidden_where == "pinned"
    hidden = 488 * 2048 * r.d_model * 2  # 488 whole sequences of a million tokens
    assert r.shard_hidden_bytes == hidden
    weights = sum(allocator_block(n * 2) for n in layer)  # read_tensors pins each tensor of one layer at a time
    assert memory.locked_bytes == weights + allocator_block(hidden)
    assert memory.hidden_host_bytes == allocator_block(hidden) and memory.hidden_bytes >= allocator_block(hidden)
    assert memory.host_bytes == w.head + weights + host_other_bytes(r, "cuda")
    if name == "opt-66b":  # 18.4 GB of hidden states lock 32 GiB; a layer's 2.04 GB of weights 3 GiB and its
        # nine 18 KiB vectors (biases, norms) 32 KiB each, fc1's 72 KiB bias 128 KiB
        assert round(hidden / 1e9, 1) == 18.4 and allocator_block(hidden) == 32 * GiB
        assert round(w.per_layer / 1e9, 2) == 2.04 and weights == 3 * GiB + 9 * 32768 + 131072
    else:  # q, o, k, v are powers of two already; gate, up, down 448 MiB -> 512 MiB
        assert allocator_block(hidden) == 16 * GiB and weights == 3 * 512 * 2**20 + 2 * 2**27 + 2 * 2**24 + 2 * 2**14


def test_a_pinned_block_that_does_not_fit_leaves_the_buffer_pageable_or_on_disk():
    w, _, r, _ = MODELS["opt-66b"]
    fits = plan(w, r, "cuda", 60 * GiB, 200 * GiB, free=H100_FREE, prefetch=True)
    room = r.shard_hidden_bytes + 1  # the bytes fit, the 32 GiB block does not: pageable, nothing of it locked
    tight = plan(w, r, "cuda", 60 * GiB, fits.host_bytes + room, free=H100_FREE, prefetch=True)
    assert tight.hidden_where == "memory" and tight.hidden_host_bytes == r.shard_hidden_bytes
    assert tight.locked_bytes == fits.locked_bytes - 32 * GiB
    short = plan(w, r, "cuda", 60 * GiB, fits.host_bytes + room - 2, free=H100_FREE, prefetch=True)
    assert short.hidden_where == "file" and short.hidden_host_bytes == 0


def test_the_plan_charges_what_grows_with_the_tokens():
    """1e9 tokens of OPT-66b: the packed data and the DataState hold an int32 token and a uint8 domain id a token
    (10 GB), the n-gram counts 16 bytes a distinct one and 24 more while a shard's join them."""
    base = sizes(9216, 36864, 72, 64)
    r = sizes(9216, 36864, 72, 64, tokens=10**9, total_tokens=10**9, vocab=50272)
    streams = 5 * 10**9 + 5 * 10**9 + 8 * (10**9 // 2048)
    assert round(streams / 1e9, 1) == 10.0
    grams = 2 * 10**9  # unknown: at most one bigram and one trigram a token (50272^2 > 1e9)
    # a shard's own 2- and 3-grams, their merge and its streams: 187 bytes a token of it
    expected = streams + 3 * 8 * 50272 + 40 * grams + 187 * 1_000_000
    assert host_token_bytes(r) == expected
    assert host_other_bytes(r, "cuda") - host_other_bytes(base, "cuda") == expected
    counted = sizes(9216, 36864, 72, 64, tokens=10**9, total_tokens=10**9, vocab=50272, distinct_grams=6 * 10**8)
    assert host_token_bytes(r) - host_token_bytes(counted) == 40 * (grams - 6 * 10**8)
    # a small vocabulary bounds them too; a part of the data holds its own tokens, the job every part's
    part = sizes(9216, 36864, 72, 64, tokens=10**6, total_tokens=4 * 10**6, vocab=100)
    assert host_token_bytes(part) == (5 * 5 * 10**6 + 8 * (10**6 // 2048) + 3 * 8 * 100
                                      + 40 * (100**2 + 10**6) + 187 * 10**6)


def meta(n_seqs=40, part=(0, 40), shard_tokens=256, calib_tokens=128, seq_len=32):
    return {"data": {"seq_len": seq_len},
            "recording": {"seq_range": list(part), "shard_tokens": shard_tokens, "n_seqs_total": n_seqs,
                          "calib_tokens": calib_tokens}}


def test_the_hidden_buffer_holds_the_largest_block():
    assert hidden_seqs(meta()) == 8                                   # a shard: 256 tokens of 32
    assert hidden_seqs(meta(part=(0, 5))) == 5                         # a part smaller than a shard
    assert hidden_seqs(meta(calib_tokens=1024)) == 32                  # the calibration sample
    assert hidden_seqs(meta(n_seqs=20, part=(0, 5), calib_tokens=1024)) == 20  # at most the whole data


def bare_recorder(tmp_path, seqs, device, hidden_budget=1 << 62) -> BlockRunner:
    """A BlockRunner with only what its hidden-state buffer needs (no model)."""
    recorder = BlockRunner.__new__(BlockRunner)
    recorder.__dict__.update(_hidden=None, _hidden_seqs=seqs, _mapped=None, spilled=False, device=device,
                             hidden_on_device=False, hidden_budget=hidden_budget, out=tmp_path / "c.h5")
    return recorder


class CountingRuntime:
    def __init__(self):
        self.pinned = []

    def pinned_empty(self, shape, dtype):
        self.pinned.append(tuple(shape))
        return torch.empty(shape, dtype=dtype)


def test_one_pinned_buffer_serves_the_calibration_and_every_shard(tmp_path):
    """A part of 21 sequences in shards of 8 (the last one 5) and a calibration of 12: one block of 12."""
    recorder = bare_recorder(tmp_path, hidden_seqs(meta(part=(0, 21), calib_tokens=384)), torch.device("cuda"))
    with accelerator.use_runtime(CountingRuntime()) as runtime:
        blocks = [recorder._buffer((n, 32, 16), torch.float16) for n in (12, 8, 8, 5)]
    assert runtime.pinned == [(12, 32, 16)]
    assert [b.shape[0] for b in blocks] == [12, 8, 8, 5]
    assert len({b.data_ptr() for b in blocks}) == 1
    recorder.release_buffers()
    assert recorder._hidden is None


def test_over_the_budget_one_mapped_file_serves_every_shard(tmp_path):
    recorder = bare_recorder(tmp_path, 8, torch.device("cpu"), hidden_budget=1000)
    first, last = (recorder._buffer((n, 32, 16), torch.float32) for n in (8, 3))
    assert recorder.spilled and recorder._mapped.stat().st_size == 8 * 32 * 16 * 4
    assert first.data_ptr() == last.data_ptr() and np.array_equal(last.shape, (3, 32, 16))
    recorder.release_buffers()
    assert not list(tmp_path.glob(".*hidden"))


def test_a_recording_runs_every_block_in_one_buffer(text_file, tmp_path, monkeypatch):
    """31 sequences in shards of 8 (the last one 7) and a calibration pass: every block in the same buffer."""
    from tests.helpers import record_tiny
    from tests.tiny_models import tiny_model_dir

    blocks, real = [], BlockRunner._buffer

    def spy(self, shape, dtype):
        buffer = real(self, shape, dtype)
        blocks.append((shape[0], buffer.untyped_storage().data_ptr()))
        return buffer
    monkeypatch.setattr(BlockRunner, "_buffer", spy)
    model = tiny_model_dir(tmp_path / "model", "llama", n_layers=2)
    state = record_tiny(tmp_path / "c.h5", model, [text_file], tokens=31 * 32, tau_rule="quantile:0.9")
    assert state.data.tokens.shape[0] == 31
    assert [n for n, _ in blocks] == [4, 8, 8, 8, 7] and len({ptr for _, ptr in blocks}) == 1
