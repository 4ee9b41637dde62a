"""The shard loop of a recording: shards of the part's sequences, one after another, each through the layers
(engine.record.block), with checkpoints on a cadence.

After each shard its tokens, samples and n-gram pairs go to a segment file of their own (cache.store,
cache.runs); the statistics of a fixed size are checkpointed atomically, uncompressed, beside them (pos_fire,
the largest, as its increment since a base: cache.state.PosIncrements) when the compute since the last
checkpoint is Recorder.CHECKPOINT_RATIO times what that one cost, so a killed job resumes from the last
checkpoint and checkpoints stay a small, flat share of the time. The calibration before the first shard is
engine.record.calibration's.
"""
from __future__ import annotations

import os
import time
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from ffnscope.cache import schema
from ffnscope.cache.state import DataState, PosIncrements, RecordingState, ngram_drop_limit
from ffnscope.cache.store import (fold_segments, remove_segment, remove_segments, segments_dir, write_base,
                                  write_segment, write_state)
from ffnscope.engine.jobs.progress import ProgressFile
from ffnscope.engine.jobs.stop import Stopped
from ffnscope.engine.model.load import LoadedModel
from ffnscope.engine.model.plan import release_freed_memory
from ffnscope.engine.record.block import BlockRunner
from ffnscope.engine.record.calibration import Calibration
from ffnscope.engine.record.grams import data_counts
from ffnscope.engine.record.meta import layer_taus
from ffnscope.engine.record.stats import LayerStats

if TYPE_CHECKING:
    from ffnscope.engine.record.config import RecordConfig


class Recorder:
    def __init__(self, config: RecordConfig, lm: LoadedModel, meta: dict, device: torch.device, resident: int,
                 domains: np.ndarray, hidden_budget: int = 1 << 62, progress: ProgressFile | None = None,
                 on_progress=None, hidden_on_device: bool = False):
        self.config = config
        self.meta = meta
        self.domains = domains  # (all sequences, seq_len) domain ids of the packed data
        self.blocks = BlockRunner(lm, meta, device, resident, config.batch_tokens, config.out, hidden_budget,
                                  hidden_on_device)
        rec = meta["recording"]
        self.layers: list[int] = rec["layers"]
        self.ngram_layers: set[int] = set(rec["ngram_layers"])
        self.seq_len: int = meta["data"]["seq_len"]
        self.d_ffn: int = meta["model"]["d_ffn"]
        self.device = device
        self.progress = progress
        self.on_progress = on_progress
        self.shard_seconds: list[tuple[float, float]] = []  # (compute, checkpoint) per shard: bench/checkpoint_cost
        self._stats: LayerStats | None = None  # the last layer's accumulators, reused by the next (LayerStats reuse)

    @property
    def runner(self):
        return self.blocks.runner

    @property
    def stop(self):
        return self.blocks.stop

    @stop.setter
    def stop(self, token) -> None:  # the job's own (engine.jobs.stop.stop_on_signals)
        self.blocks.stop = token

    @property
    def spilled(self) -> bool:
        return self.blocks.spilled

    def release_buffers(self) -> None:
        self.blocks.release_buffers()

    def _report(self, fields: dict) -> None:
        if self.progress:
            self.progress.update(**fields)
        if self.on_progress:
            self.on_progress(fields)

    def calibrate(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        """engine.record.calibration on the whole packed data `tokens` -> layer -> neurons counted from the start."""
        return Calibration(self.blocks, self.meta, self._report).calibrate(tokens)

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
        self.segments = self._first_segments(state)  # the final write merges their runs (job)
        self._named = list(self.segments)  # what checkpoints name: the segments, folded into maps (fold_segments)
        self.checkpointed: list[int] = []  # shards after which a checkpoint was written
        self._reserve(state, tokens)
        since = 0.0  # compute since the last checkpoint
        shard_start = time.perf_counter()
        for shard in range(state.shards_done, n_shards):
            lo, hi = shard * per_shard, min((shard + 1) * per_shard, len(tokens))
            recorded = self._record_shard(state, tokens[lo:hi], np.arange(seq_lo + lo, seq_lo + hi),
                                          partial(report, shard))
            t0 = time.perf_counter()
            since += t0 - shard_start
            last, stopping = shard + 1 == n_shards, self.stop.after_shard
            if self._save_shard(state, shard, recorded, checkpoint=not last, since=since, stopping=stopping):
                since = 0.0
            t1 = time.perf_counter()
            self.shard_seconds.append((t0 - shard_start, t1 - t0))
            shard_start = t1
            if stopping and not last:  # the last shard goes on to the final write: a complete cache
                raise Stopped()
            # once a shard, not per layer: trimming returns the batch buffers to the OS, and each
            # layer faulting them back in cost ~8 % of the recording's time
            release_freed_memory()

    def _reserve(self, state: RecordingState, tokens: np.ndarray) -> None:
        """Room for the part's streams and samples: appending a shard's then never moves the others."""
        state.data.reserve(len(tokens))
        expected = self.meta["recording"]["sample_rate"] * tokens.size  # drawn per position: room for 5 sigma more
        state.samples.reserve(len(state.samples.index) + int(expected + 5 * expected ** 0.5) + 16)

    def _save_shard(self, state: RecordingState, shard: int, recorded, checkpoint: bool, since: float,
                    stopping: bool) -> bool:
        """A recorded shard into `state` and its segment; then a checkpoint if one is due (never after the last
        shard, `checkpoint` False: the final write follows, and takes from the shard's segment only its pair
        runs) -> whether one was written."""
        data, samples, pairs = recorded
        state.data.add(data)
        state.samples.commit(samples)
        state.shards_done = shard + 1
        self.segments.append(write_segment(self.config.out, f"{shard:06d}", data, samples, pairs, streams=checkpoint))
        if not checkpoint:
            return False
        self._named = fold_segments(self.config.out, self._named + self.segments[-1:], state.shards_done)
        per_shard = max(1, self.meta["recording"]["shard_tokens"] // self.seq_len)
        rebase = self.increments.full_after(per_shard)  # another shard would make them as wide as pos_fire
        if not self._checkpoint_due(since, stopping, rebase):
            return False
        if self.progress:
            self.progress.update(force=True, phase="checkpoint")
        t = time.perf_counter()
        self._checkpoint(state, self._named, rebase)
        self.checkpoint_cost = time.perf_counter() - t
        self.checkpointed.append(shard + 1)
        return True

    def _record_shard(self, state: RecordingState, block: np.ndarray, seq_index: np.ndarray, report):
        """One shard through the layers, its fixed-size statistics added to `state.layers` (and pos_fire's to
        the increments) as each layer is done -> (its DataState, its Samples: filled in the room after
        state.samples' (Samples.tail), its pair runs: layer -> order -> Sparse, only what is still counted)."""
        rec = self.meta["recording"]
        primary = rec["primary_index"]
        sample_mask = self.blocks.sample_rows(seq_index, rec["sample_rate"])
        # the sampled vectors go straight into the room after the recording's: no copy per shard but the layer's
        samples = state.samples.tail((seq_index[:, None] * self.seq_len + np.arange(self.seq_len))[sample_mask])
        position = {index: p for p, index in enumerate(self.layers)}
        pairs: dict[int, dict] = {}
        overflowed: set[int] = set()  # layers whose pairs a GPU left incomplete (_exact_pairs)

        def stats_for(index):
            counted = state.layers[index].ngram_counted if index in self.ngram_layers else None
            self._stats = LayerStats(self.d_ffn, self.seq_len, layer_taus(rec, index), primary, rec["topk"],
                                     self.device, counted, reuse=self._stats,  # the last layer's is done with
                                     samples_out=samples.acts[position[index]])
            return self._stats

        def layer_done(index, stats):
            stats.take_samples()  # into samples.acts
            host, layer = stats.to_host(), state.layers[index]
            layer.add(host)  # the fixed-size statistics; the layer holds no pairs (_first_segments)
            self.increments.add(index, host.pos_fire)
            layer.drop_ngrams_over(ngram_drop_limit(rec), primary)
            if layer.ngram_counted is not None:  # the shard's run: only what is still counted
                pairs[index] = {n: p.drop_neurons(layer.ngram_counted) for n, p in host.ngrams.items()}
                if stats.pairs_overflowed:
                    overflowed.add(index)

        self.increments.start(len(block))
        self.blocks.run(block, seq_index, self.layers, stats_for, layer_done, report, sample_mask)
        if overflowed:
            pairs.update(self._exact_pairs(state, block, seq_index, sorted(overflowed)))
        unigram, grams = data_counts(block, self.blocks.vocab, self.blocks.first_pos)
        data = DataState(block, seq_index, self.domains[seq_index], unigram, grams)
        return data, samples, pairs

    def _exact_pairs(self, state: RecordingState, block: np.ndarray, seq_index: np.ndarray, layers: list[int]):
        """The shard's n-gram pairs of `layers` again, batch by batch (LayerStats exact_pairs): on a GPU a batch
        with more fires than LayerStats kept on the device left them incomplete. Rare (the capacity is set for
        it), and costs one more pass of the shard up to the last of them -> layer -> order -> Sparse."""
        rec, pairs = self.meta["recording"], {}

        def stats_for(index):
            return LayerStats(self.d_ffn, self.seq_len, layer_taus(rec, index), rec["primary_index"], 1, self.device,
                              state.layers[index].ngram_counted, exact_pairs=True)

        def layer_done(index, stats):
            pairs[index] = stats.to_host().ngrams
        self.blocks.run(block, seq_index, layers, stats_for, layer_done)
        return pairs

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
            self._report(dict(phase="recording", shard=shard + 1, n_shards=n_shards, layer=layer, n_layers=last + 1,
                               tokens_done=int(done * total), tokens_total=total, percent=100.0 * done,
                               tokens_per_s=rate, eta_s=eta))
        return report
