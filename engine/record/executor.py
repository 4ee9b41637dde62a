"""The layer-major streaming executor (DESIGN.md, "Layer-major streaming").

For each shard (many sequences) the model's embeddings are computed once; then each layer up to
the last recorded one gets its weights onto the device once, every batch of the shard goes
through it while its statistics accumulate, and the shard's hidden states (host memory, or a
memory-mapped file when over the host budget) move on to the next layer. No logits are computed.
After each shard its tokens, samples and n-gram pairs go to a segment file of their own (cache.store,
cache.runs); the statistics of a fixed size are checkpointed atomically, uncompressed, beside them
(pos_fire, the largest, as its increment since a base: cache.state.PosIncrements) when the compute
since the last checkpoint is Recorder.CHECKPOINT_RATIO times what that one cost, so a killed job
resumes from the last checkpoint and checkpoints stay a small, flat share of the time.
"""
from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ffnscope.cache import schema
from ffnscope.cache.atomic import new_spill_file
from ffnscope.cache.state import NGRAM_ORDERS, DataState, PosIncrements, RecordingState, Samples, ngram_drop_limit
from ffnscope.cache.store import (fold_segments, remove_segment, remove_segments, segments_dir, write_base,
                                  write_segment, write_state)
from ffnscope.engine.model import accelerator
from ffnscope.engine.model.batches import seq_batches
from ffnscope.engine.model.hooks import FFNProbe
from ffnscope.engine.model.runner import HiddenStates, LayerRunner
from ffnscope.engine.model.plan import calibration_seqs, hidden_placement, hidden_seqs, release_freed_memory
from ffnscope.engine.model.load import LoadedModel
from ffnscope.engine.jobs.progress import ProgressFile
from ffnscope.engine.jobs.stop import Stopped, StopToken
from ffnscope.engine.record.grams import data_counts, gram_keys
from ffnscope.engine.record.stats import ActScale, BatchContext, LayerStats

if TYPE_CHECKING:
    from ffnscope.engine.record.config import RecordConfig


class Recorder:
    def __init__(self, config: RecordConfig, lm: LoadedModel, meta: dict, device: torch.device, resident: int,
                 domains: np.ndarray, hidden_budget: int = 1 << 62, progress: ProgressFile | None = None,
                 on_progress=None, hidden_on_device: bool = False):
        self.config = config
        self.domains = domains              # (all sequences, seq_len) domain ids of the packed data
        self.hidden_budget = hidden_budget  # bytes of hidden states kept in RAM before a mapped file
        self.hidden_on_device = hidden_on_device  # the plan found a GPU room for a shard's hidden states
        self.hidden_bytes_moved = 0         # hidden-state bytes between host and device (bench/gpu_scale)
        self.spilled = False                # hidden states went to a memory-mapped file at least once
        self._mapped: Path | None = None
        self._hidden: torch.Tensor | None = None  # the one hidden-state buffer, made at the first block
        self._hidden_seqs = hidden_seqs(meta)     # its sequences: the largest block (plan.hidden_seqs)
        self.lm = lm
        self.meta = meta
        rec = meta["recording"]
        self.layers: list[int] = rec["layers"]
        self.ngram_layers: set[int] = set(rec["ngram_layers"])
        self.taus: list[float] = rec["taus"]   # the absolute thresholds; layer_taus(i) has the layer's rows
        self.primary: int = rec["primary_index"]
        self.seq_len: int = meta["data"]["seq_len"]
        self.vocab: int = meta["model"]["vocab_size"]
        self.first_pos: int = 0 if meta["tokenizer"]["start_id"] is None else 1
        self.sample_rate: float = rec["sample_rate"]
        self.d_ffn: int = meta["model"]["d_ffn"]
        self.device = device
        self.runner = LayerRunner(lm.adapter, device, resident)
        self.probe = FFNProbe(lm.adapter)
        self.progress = progress
        self.on_progress = on_progress
        self.stop = StopToken()  # the job replaces it with its own (engine.jobs.stop.stop_on_signals)
        self.seconds = {"statistics": 0.0, "checkpoints": 0.0}  # where recording time goes beyond the layers
        self.shard_seconds: list[tuple[float, float]] = []  # (compute, checkpoint) per shard: bench/checkpoint_cost

    # --- one pass over a block of sequences -------------------------------------------------
    def _sample_rows(self, seq_index: np.ndarray) -> np.ndarray:
        """Fixed random token positions, decided per global sequence so parts agree."""
        mask = np.zeros((len(seq_index), self.seq_len), bool)
        if self.sample_rate > 0:
            for row, s in enumerate(seq_index):
                draw = np.random.default_rng([self.meta["data"]["seed"], int(s)]).random(self.seq_len)
                mask[row] = draw < self.sample_rate
            mask[:, : self.first_pos] = False
        return mask

    def run_block(self, tokens: np.ndarray, seq_index: np.ndarray, layers: list[int], stats_for,
                  layer_done, report=None) -> np.ndarray:
        """Push sequences through layers 0..max(layers), layer-major, handing each wanted layer's
        statistics to layer_done(index, stats) as soon as the layer is through (so only one layer's
        accumulators exist at a time); -> the global indices of the sampled tokens."""
        batches = seq_batches(len(tokens), self.seq_len, self.config.batch_tokens)
        ids = torch.as_tensor(tokens.astype(np.int64))
        keys, valid = gram_keys(tokens, self.vocab, self.first_pos)
        sample_mask = self._sample_rows(seq_index)
        seq_start = torch.as_tensor(seq_index * self.seq_len)
        dev = self.device

        contexts = []
        hidden = None
        for b, (lo, hi) in enumerate(batches):
            h = self.runner.embed(ids[lo:hi])
            if hidden is None:
                hidden = self._host_buffer((len(tokens), self.seq_len, h.shape[-1]), h.dtype)
            hidden[lo:hi] = h.to(hidden.device)
            self.hidden_bytes_moved += h.nbytes if hidden.device.type != dev.type else 0
            contexts.append(BatchContext(
                seq_start=seq_start[lo:hi].to(dev),
                gram_keys={n: torch.as_tensor(keys[n][lo:hi].reshape(-1)).to(dev) for n in NGRAM_ORDERS},
                gram_valid={n: torch.as_tensor(valid[n][lo:hi].reshape(-1)).to(dev) for n in NGRAM_ORDERS},
                sample_rows=torch.as_tensor(np.flatnonzero(sample_mask[lo:hi].reshape(-1))).to(dev),
                seq_len=self.seq_len))

        wanted = set(layers)
        last = max(layers)
        states = HiddenStates(hidden, dev, batches)
        try:
            for index in range(last + 1):
                stats = stats_for(index) if index in wanted else None
                # the next layer's weights are read meanwhile, on the runner's prefetch thread
                weights = self.runner.weights(index, index + 1 if index < last else None, self.stop)
                with self.probe.attached(index):
                    for b in range(len(batches)):
                        self.stop.check()
                        out = self.runner.run(index, states.get(b), weights)
                        g, act = self.probe.take()
                        if stats is not None:
                            t0 = time.perf_counter()
                            stats.update(g, act, contexts[b])
                            self.seconds["statistics"] += time.perf_counter() - t0
                        if index < last:
                            states.put(b, out)
                        if report:
                            report(index, last, b + 1, len(batches))
                del weights
                if stats is not None:
                    layer_done(index, stats)
        finally:  # a stop or an error leaves no read in flight nor copy queued behind it
            self.runner.close()
            states.finish()
            self.hidden_bytes_moved += states.bytes_moved
        return (seq_index[:, None] * self.seq_len + np.arange(self.seq_len))[sample_mask]

    def _host_buffer(self, shape, dtype) -> torch.Tensor:
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
                path = new_spill_file(Path(self.config.out))  # a new name, never a file someone put there
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

    def layer_taus(self, index: int) -> list[float]:
        """The thresholds of layer `index`'s fire_count rows: the absolute ones, and for a relative rule
        the layer's own tau_l as the last (primary) row."""
        rec = self.meta["recording"]
        if self.primary < len(self.taus):
            return list(self.taus)
        return [*self.taus, float(rec["layer_taus"][str(index)])]

    # --- calibration: per-layer thresholds of a relative rule, and neurons that need no n-gram counts
    def calibration_rows(self, n_seqs: int) -> np.ndarray:
        """Sequences of the calibration sample: spread evenly over the whole packed data (not this part's
        slice), so every part of a recording decides the same."""
        n = calibration_seqs(n_seqs, self.config.calib_tokens, self.seq_len)
        return np.unique(np.linspace(0, n_seqs - 1, n).round().astype(np.int64))

    def _calibration_pass(self, tokens: np.ndarray, rows: np.ndarray, layers: list[int], stats_for, layer_done,
                          report=None):
        saved_rate, self.sample_rate = self.sample_rate, 0.0
        try:
            self.run_block(tokens[rows], rows, layers, stats_for, layer_done, report)
        finally:
            self.sample_rate = saved_rate

    def _calibration_report(self, passes: list[int], n_tokens: int):
        """A run_block report for the calibration: `passes` holds each pass's layer count (the last layer
        + 1); the work is counted in layers, shown as tokens (the whole calibration is
        tokens_total = n_tokens x passes), with percent, tokens/s and ETA like the recording's.
        -> (report, next_pass)."""
        started, current = time.time(), [0]
        total_work = sum(passes)

        def report(layer, last, batch, n_batches):
            done = (sum(passes[:current[0]]) + layer + batch / n_batches) / total_work
            tokens_total = n_tokens * len(passes)
            tokens_done, elapsed = done * tokens_total, time.time() - started
            rate = tokens_done / elapsed if elapsed > 0 else 0.0
            fields = dict(phase="calibrating", calibration_pass=current[0] + 1, calibration_passes=len(passes),
                          layer=layer, n_layers=last + 1, tokens_done=int(tokens_done), tokens_total=tokens_total,
                          percent=100.0 * done, tokens_per_s=rate,
                          eta_s=(tokens_total - tokens_done) / rate if rate > 0 else None)
            if self.progress:
                self.progress.update(**fields)
            if self.on_progress:
                self.on_progress(fields)

        def next_pass():
            current[0] += 1
        return report, next_pass

    def calibrate(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        """On the calibration sample of the whole packed data `tokens`: a relative rule's tau_l per layer
        (written into meta.recording.layer_taus), then which neurons of the n-gram layers get no n-gram
        counts from the start (-> layer -> counted mask). Skipping early only saves memory; it proves
        nothing, so it is cautious (engine.record.job.skip_notes reports the skips the full counts did not
        justify), and neurons counted from the start lose their counts only on proof (record_shards)."""
        from ffnscope.engine.record.meta import parse_tau_rule

        rec = self.meta["recording"]
        rows = self.calibration_rows(len(tokens))
        kind, value = parse_tau_rule(rec.get("tau_rule"))
        layers = sorted(self.ngram_layers)
        limit, guard = self._skip_limit(tokens[rows]) if layers else (None, 0)
        passes = ([max(self.layers) + 1] if kind != "absolute" else []) + \
                 ([max(layers) + 1] if layers and limit is not None else [])
        report, next_pass = self._calibration_report(passes, len(rows) * self.seq_len)
        if kind != "absolute":
            found: dict[int, float] = {}

            def scale_done(index, probe):
                found[index] = probe.tau(kind, value)
            n_tokens = len(rows) * self.seq_len
            self._calibration_pass(tokens, rows, self.layers, lambda _i: ActScale(self.d_ffn, n_tokens), scale_done,
                                   report)
            rec["layer_taus"] = {str(i): found[i] for i in self.layers}
            next_pass()
        counted = {i: np.ones(self.d_ffn, bool) for i in layers}
        if not layers or limit is None:
            return counted
        n_tokens = len(rows) * self.seq_len

        def stats_for(index):
            return LayerStats(self.d_ffn, self.seq_len, [self.layer_taus(index)[self.primary]], 0, 1, self.device,
                              None)

        def layer_done(index, stats):
            fires = stats.fire_count[0].cpu().numpy()
            counted[index] = ~((fires > limit * n_tokens) & (fires > guard))
        self._calibration_pass(tokens, rows, layers, stats_for, layer_done, report)
        return counted

    SKIP_MARGIN = 2.0  # "auto" skips early only what fires this many times more often than any detector can

    def _skip_limit(self, sample: np.ndarray) -> tuple[float | None, float]:
        """-> (frequency above which a neuron of the sample is skipped from the start, or None: none is;
        fires in the sample it must exceed besides). --ngram-max-freq F: F. "auto": SKIP_MARGIN x the
        bound's frequency, and the neuron must also fire more often than a detector could within the
        sample itself (so a neuron of tokens the sample happens to be rich in is kept)."""
        rec = self.meta["recording"]
        cap, bound = rec["ngram_max_freq"], rec.get("ngram_bound")
        if cap != "auto":
            return (float(cap) if cap < 1 else None), 0
        if bound is None:
            return None, 0
        limit = self.SKIP_MARGIN * bound["freq"]
        if limit >= 1:
            return None, 0
        from ffnscope.engine.analysis.ngrams import NgramParams, detector_fire_bound

        unigram, grams = data_counts(sample, self.vocab, self.first_pos)
        own = detector_fire_bound({1: unigram, **{n: g.count for n, g in grams.items()}}, len(sample),
                                  self.seq_len, self.first_pos, NgramParams())
        return limit, own["fires"]

    # --- the shard loop ------------------------------------------------------------------------
    def _first_segments(self, state: RecordingState) -> list:
        """The segments the shards' checkpoints build on, named by a first checkpoint (timed: the cost the
        cadence weighs compute against): none on a fresh start; on a resume (`state` read from the
        checkpoint at config.out, without its n-gram pairs) one holding everything recorded so far: the
        streams read whole, the pairs merged from the checkpoint's runs in bounded memory, and pos_fire so
        far as the base of this run's increments; they are written before the segments the previous run
        left (and any a kill left unnamed) go. From here the layers hold no n-gram pairs: each shard's go to
        its own segment as sorted runs (cache.runs)."""
        out = self.config.out
        counted = {i: layer.ngram_counted for i, layer in state.layers.items() if layer.ngram_counted is not None}
        for layer in state.layers.values():
            layer.ngrams = {}
        self.increments = PosIncrements()
        base = []
        if state.shards_done:
            base = [write_segment(out, f"upto{state.shards_done:06d}", state.data, state.samples, counted=counted)]
        t0 = time.perf_counter()
        self._checkpoint(state, base, rebase=state.shards_done > 0)
        self.checkpoint_cost = time.perf_counter() - t0
        remove_segments(out, keep=[s.name for s in base] + ([self.increments.base] if self.increments.base else []))
        return base

    def _checkpoint(self, state: RecordingState, segments: list, rebase: bool) -> None:
        """A checkpoint naming `segments` (streams and pair runs) and, for pos_fire, a base and the increments
        since (cache.state.PosIncrements): the statistics of a fixed size but pos_fire are written whole,
        pos_fire's change only. `rebase`: pos_fire as it is now becomes the base first (write_base), and the
        base it replaces goes once the checkpoint no longer names it."""
        out, replaced = self.config.out, self.increments.base
        if rebase:
            self.increments.rebase(write_base(out, state))
        write_state(out, state, schema.PARTIAL, compress=False, segments=segments, increments=self.increments)
        if rebase and replaced not in (None, self.increments.base):
            remove_segment(out, replaced)
        self.checkpointed_files = self._segment_files()

    # a checkpoint once the compute since the last one is this many times what the last one cost:
    # checkpoints stay <= 1/RATIO of the compute, whatever their size (with pos_fire written as its increment
    # they cost little, and usually come after every shard)
    CHECKPOINT_RATIO = 25.0  # 1/25 = 0.04: room under the 0.05 goal for the segments and for noise

    def _checkpoint_due(self, since: float, stopping: bool, rebase: bool) -> bool:
        """Whether the shard just recorded gets a checkpoint (never the last: the final write follows): when
        the compute `since` the last is worth its cost (a kill loses at most that much: the resume redoes
        those shards), when asked to stop after it (engine.jobs.stop), or when pos_fire needs a new base."""
        return stopping or rebase or since >= self.CHECKPOINT_RATIO * self.checkpoint_cost

    def _segment_files(self) -> set[str]:
        try:
            return set(os.listdir(segments_dir(self.config.out)))
        except OSError:
            return set()

    def drop_unnamed(self) -> None:
        """After a failure (a full disk): the segments, maps and bases written since the last checkpoint go. It
        names none of them and a resume redoes their shards; the disk needs the room."""
        remove_segments(self.config.out, keep=self.checkpointed_files)

    def record_shards(self, state: RecordingState, tokens: np.ndarray, seq_lo: int) -> None:
        """Record the part's shards after state.shards_done into `state`: each shard's streams, samples and
        pair runs go to a segment of their own at once, the checkpoint naming them on the cadence."""
        self.checkpointed_files = self._segment_files()  # what the checkpoint on disk may name (drop_unnamed)
        try:
            self._record_shards(state, tokens, seq_lo)
        except Exception:  # a failure, a stop; what a kill leaves goes at the next start
            self.drop_unnamed()
            raise

    def _record_shards(self, state: RecordingState, tokens: np.ndarray, seq_lo: int) -> None:
        rec = self.meta["recording"]
        per_shard = max(1, rec["shard_tokens"] // self.seq_len)
        n_shards = rec["n_shards"]
        report = self._shard_report(n_shards, state.shards_done)
        self.segments = segments = self._first_segments(state)  # the final write merges their runs (job)
        named = list(segments)  # what checkpoints name: the segments, folded into maps (fold_segments)
        self.checkpointed: list[int] = []  # shards after which a checkpoint was written
        state.data.reserve(len(tokens))  # appending a shard's streams then never moves the others
        expected = self.sample_rate * tokens.size  # samples are drawn per position: room for 5 sigma more
        state.samples.reserve(len(state.samples.index) + int(expected + 5 * expected ** 0.5) + 16)
        since = 0.0  # compute since the last checkpoint
        shard_start = time.perf_counter()
        for shard in range(state.shards_done, n_shards):
            lo, hi = shard * per_shard, min((shard + 1) * per_shard, len(tokens))
            data, shard_samples, pairs = self._record_shard(state, tokens[lo:hi], np.arange(seq_lo + lo, seq_lo + hi),
                                                            partial(report, shard))
            state.data.add(data)
            state.samples.add(shard_samples)
            state.shards_done = shard + 1
            t0 = time.perf_counter()
            since += t0 - shard_start
            segments.append(write_segment(self.config.out, f"{shard:06d}", data, shard_samples, pairs))
            named = fold_segments(self.config.out, named + segments[-1:], state.shards_done)
            last, stopping = shard + 1 == n_shards, self.stop.after_shard
            rebase = self.increments.full_after(per_shard)  # another shard would make them as wide as pos_fire
            if not last and self._checkpoint_due(since, stopping, rebase):
                if self.progress:
                    self.progress.update(force=True, phase="checkpoint")
                t = time.perf_counter()
                self._checkpoint(state, named, rebase)
                self.checkpoint_cost, since = time.perf_counter() - t, 0.0
                self.checkpointed.append(shard + 1)
            t1 = time.perf_counter()
            self.seconds["checkpoints"] += t1 - t0
            self.shard_seconds.append((t0 - shard_start, t1 - t0))
            shard_start = t1
            if stopping and not last:  # the last shard goes on to the final write: a complete cache
                raise Stopped()
            # once a shard, not per layer: trimming returns the batch buffers to the OS, and each
            # layer faulting them back in cost ~8 % of the recording's time
            release_freed_memory()

    def _record_shard(self, state: RecordingState, block: np.ndarray, seq_index: np.ndarray, report):
        """One shard through the layers, its fixed-size statistics added to `state.layers` (and pos_fire's to
        the increments) as each layer is done -> (its DataState, its Samples, its pair runs: layer -> order ->
        Sparse, only what is still counted)."""
        rec = self.meta["recording"]
        samples: dict[int, np.ndarray] = {}
        pairs: dict[int, dict] = {}

        def stats_for(index):
            counted = state.layers[index].ngram_counted if index in self.ngram_layers else None
            return LayerStats(self.d_ffn, self.seq_len, self.layer_taus(index), self.primary, rec["topk"],
                              self.device, counted)

        def layer_done(index, stats):
            samples[index] = stats.take_samples()
            host, layer = stats.to_host(), state.layers[index]
            layer.add(host)  # the fixed-size statistics; the layer holds no pairs (_first_segments)
            self.increments.add(index, host.pos_fire)
            layer.drop_ngrams_over(ngram_drop_limit(rec), self.primary)
            if layer.ngram_counted is not None:  # the shard's run: only what is still counted
                pairs[index] = {n: p.drop_neurons(layer.ngram_counted) for n, p in host.ngrams.items()}

        self.increments.start(len(block))
        sample_index = self.run_block(block, seq_index, self.layers, stats_for, layer_done, report)
        unigram, grams = data_counts(block, self.vocab, self.first_pos)
        data = DataState(block, seq_index, self.domains[seq_index], unigram, grams)
        return data, Samples(sample_index.astype(np.int64), np.stack([samples[i] for i in self.layers])), pairs

    def _shard_report(self, n_shards: int, done_at_start: int):
        """A run_block report for the shards: `report(shard, layer, last, batch, n_batches)` puts the
        recording's progress (percent, tokens/s over this run's shards, ETA) in the progress file."""
        started = time.time()

        def report(shard, layer, last, batch, n_batches):
            frac_shard = (layer + batch / n_batches) / (last + 1)
            done = (shard + frac_shard) / n_shards
            elapsed = time.time() - started
            fresh = done - done_at_start / n_shards
            total = self.meta["recording"]["part_tokens"]
            rate = fresh * total / elapsed if elapsed > 0 else 0.0
            eta = (1 - done) * total / rate if rate > 0 else None
            fields = dict(phase="recording", shard=shard + 1, n_shards=n_shards, layer=layer,
                          n_layers=last + 1, tokens_done=int(done * total), tokens_total=total,
                          percent=100.0 * done, tokens_per_s=rate, eta_s=eta)
            if self.progress:
                self.progress.update(**fields)
            if self.on_progress:
                self.on_progress(fields)
        return report
