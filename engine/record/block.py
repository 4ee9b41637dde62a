"""One block of sequences through the layers, layer-major (README.md, "Large models on one GPU").

The block's embeddings are computed once; then each layer up to the last wanted one gets its weights onto the
device once, every batch of the block goes through it while the wanted layers' statistics accumulate, and the
block's hidden states move on to the next layer. No logits are computed. The hidden states live in one buffer,
made at the first block for the largest the recording runs and reused by every later one: on the GPU, in pinned
or pageable host memory, or in a memory-mapped file when over the host budget (engine.model.plan).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ffnscope.cache.atomic import new_spill_file
from ffnscope.cache.state import NGRAM_ORDERS
from ffnscope.engine.jobs.stop import StopToken
from ffnscope.engine.model import accelerator
from ffnscope.engine.model.batches import seq_batches
from ffnscope.engine.model.hooks import FFNProbe
from ffnscope.engine.model.load import LoadedModel
from ffnscope.engine.model.plan import hidden_placement, hidden_seqs
from ffnscope.engine.model.runner import HiddenStates, LayerRunner
from ffnscope.engine.record.grams import GramTable, gram_keys
from ffnscope.engine.record.stats import BatchContext


class BlockRunner:
    """Runs blocks of a recording's sequences through its model (`meta`: the recording's meta dict)."""

    def __init__(self, lm: LoadedModel, meta: dict, device: torch.device, resident: int, batch_tokens: int,
                 out: Path, hidden_budget: int = 1 << 62, hidden_on_device: bool = False):
        self.meta = meta
        self.device = device
        self.batch_tokens = batch_tokens
        self.out = out  # the recording's cache: an over-budget hidden-state file goes beside it
        self.hidden_budget = hidden_budget    # bytes of hidden states kept in RAM before a mapped file
        self.hidden_on_device = hidden_on_device  # the plan found a GPU room for a block's hidden states
        self.seq_len: int = meta["data"]["seq_len"]
        self.vocab: int = meta["model"]["vocab_size"]
        self.first_pos: int = 0 if meta["tokenizer"]["start_id"] is None else 1
        self.runner = LayerRunner(lm.adapter, device, resident)
        self.probe = FFNProbe(lm.adapter)
        self.stop = StopToken()  # the job replaces it with its own (engine.jobs.stop.stop_on_signals)
        self.hidden_bytes_moved = 0         # hidden-state bytes between host and device (bench/gpu_scale)
        self.spilled = False                # hidden states went to a memory-mapped file at least once
        self._mapped: Path | None = None
        self._hidden: torch.Tensor | None = None  # the one hidden-state buffer, made at the first block
        self._hidden_seqs = hidden_seqs(meta)     # its sequences: the largest block (plan.hidden_seqs)

    def sample_rows(self, seq_index: np.ndarray, sample_rate: float) -> np.ndarray:
        """Fixed random token positions (a mask of the sequences' positions), decided per global sequence so
        parts agree."""
        mask = np.zeros((len(seq_index), self.seq_len), bool)
        if sample_rate > 0:
            for row, s in enumerate(seq_index):
                draw = np.random.default_rng([self.meta["data"]["seed"], int(s)]).random(self.seq_len)
                mask[row] = draw < sample_rate
            mask[:, : self.first_pos] = False
        return mask

    def run(self, tokens: np.ndarray, seq_index: np.ndarray, layers: list[int], stats_for, layer_done,
            report=None, sample_mask: np.ndarray | None = None) -> None:
        """Push sequences through layers 0..max(layers), layer-major, handing each wanted layer's statistics to
        layer_done(index, stats) as soon as the layer is through (so only one layer's accumulators exist at a
        time). sample_mask (sample_rows): the positions whose activation vectors the statistics keep."""
        batches = seq_batches(len(tokens), self.seq_len, self.batch_tokens)
        if sample_mask is None:
            sample_mask = np.zeros(tokens.shape, bool)
        hidden, contexts = self._embed(tokens, seq_index, batches, sample_mask)
        states = HiddenStates(hidden, self.device, batches)
        last = max(layers)
        try:
            for index in range(last + 1):
                self._run_layer(index, last, states, contexts, stats_for(index) if index in layers else None,
                                layer_done, report)
        finally:  # a stop or an error leaves no read in flight nor copy queued behind it
            self.runner.close()
            states.finish()
            self.hidden_bytes_moved += states.bytes_moved

    def _embed(self, tokens: np.ndarray, seq_index: np.ndarray, batches: list, sample_mask: np.ndarray):
        """The block's hidden states entering layer 0, and each batch's context (its n-gram keys, sampled rows:
        built once, shared by every layer). The block's ids and contexts go to the device whole and are sliced
        there, and the embeddings come back without waiting: on a GPU a blocking copy per batch would wait for
        everything queued before it."""
        dev, seq_len = self.device, self.seq_len
        keys, valid = gram_keys(tokens, self.vocab, self.first_pos)
        ids = torch.as_tensor(tokens.astype(np.int64)).to(dev)
        seq_start = torch.as_tensor(seq_index * seq_len).to(dev)
        on_dev = {name: {n: torch.as_tensor(a[n].reshape(-1)).to(dev) for n in NGRAM_ORDERS}
                  for name, a in (("keys", keys), ("valid", valid))}
        sampled = np.flatnonzero(sample_mask.reshape(-1))  # the block's sampled token rows, ascending
        sampled_dev = torch.as_tensor(sampled).to(dev)
        hidden, contexts = None, []
        for lo, hi in batches:
            h = self.runner.embed(ids[lo:hi])
            if hidden is None:
                hidden = self._buffer((len(tokens), seq_len, h.shape[-1]), h.dtype)
            hidden[lo:hi].copy_(h, non_blocking=True)
            self.hidden_bytes_moved += h.nbytes if hidden.device.type != dev.type else 0
            rows = slice(lo * seq_len, hi * seq_len)
            first, end = np.searchsorted(sampled, (rows.start, rows.stop))
            contexts.append(BatchContext(
                seq_start=seq_start[lo:hi],
                gram_keys={n: k[rows] for n, k in on_dev["keys"].items()},
                gram_valid={n: v[rows] for n, v in on_dev["valid"].items()},
                sample_rows=sampled_dev[first:end] - rows.start, seq_len=seq_len,
                gram_table=None if dev.type != "cpu" else GramTable.of({n: k[lo:hi] for n, k in keys.items()},
                                                                        {n: v[lo:hi] for n, v in valid.items()})))
        if hidden is not None and hidden.device.type != dev.type:
            accelerator.synchronize(dev)  # once a block: the embeddings are in the host buffer before it is read
        return hidden, contexts

    def _run_layer(self, index: int, last: int, states: HiddenStates, contexts: list, stats, layer_done,
                   report) -> None:
        """Every batch through layer `index` (its output replacing its hidden states, but after the last layer),
        its statistics into `stats` (None: a layer only passed through)."""
        n_batches = len(contexts)
        # the next layer's weights are read meanwhile, on the runner's prefetch thread
        weights = self.runner.weights(index, index + 1 if index < last else None, self.stop)
        with self.probe.attached(index):
            for b in range(n_batches):
                self.stop.check()
                out = self.runner.run(index, states.get(b), weights)
                g, act = self.probe.take()
                if stats is not None:
                    stats.update(g, act, contexts[b])
                if index < last:
                    states.put(b, out)
                if report:
                    report(index, last, b + 1, n_batches)
        del weights
        if stats is not None:
            layer_done(index, stats)

    def _buffer(self, shape, dtype) -> torch.Tensor:
        """A block's hidden states (`shape`: its sequences, seq_len, d_model): the leading rows of one buffer,
        made at the first block for the largest the recorder runs (plan.hidden_seqs) and reused by every shard,
        the last and the calibration's included: torch's pinned allocator caches, locked, every block it made,
        so a second size would lock a second block. Where the plan puts it (plan.hidden_placement): on the GPU,
        pinned host memory for a GPU's asynchronous copies, pageable memory, or a memory-mapped file."""
        buffer = self._hidden
        if buffer is None or buffer.dtype != dtype or buffer.shape[1:] != shape[1:] or len(buffer) < shape[0]:
            self.release_buffers()  # never, as planned; a block past the plan gets a buffer of its own
            rows = (max(self._hidden_seqs, shape[0]), *shape[1:])
            nbytes = int(np.prod(rows)) * torch.empty(0, dtype=dtype).element_size()
            where = hidden_placement(nbytes, self.hidden_budget, self.device.type, self.hidden_on_device)
            if where == "device":
                buffer = torch.empty(rows, dtype=dtype, device=self.device)
            elif where == "pinned":
                buffer = accelerator.runtime.pinned_empty(rows, dtype)
            elif where == "memory":
                buffer = torch.empty(rows, dtype=dtype)
            else:  # over budget: hidden states live in a file the OS pages in and out
                path = new_spill_file(Path(self.out))  # a new name, never a file someone put there
                self._mapped = path
                self.spilled = True
                buffer = torch.from_file(str(path), shared=True, size=int(np.prod(rows)), dtype=dtype).view(rows)
            self._hidden = buffer
        return buffer[: shape[0]]

    def release_buffers(self) -> None:
        self._hidden = None  # a pinned block goes back to torch's cache, still locked, for the process's life
        if self._mapped is not None:
            self._mapped.unlink(missing_ok=True)
            self._mapped = None
