"""The calibration before a recording: on a sample spread over the whole packed data (so every part of a
recording decides the same), a relative firing rule's threshold per layer, then which neurons of the n-gram
layers get no n-gram counts from the start.

Skipping early only saves memory; it proves nothing, so it is cautious (engine.record.job.skip_notes reports
the skips the full counts did not justify), and the neurons counted from the start lose their counts only on
proof (the shard loop, engine.record.executor). By default the sample is a small share of the data
(engine.record.config.default_calib_tokens): a small recording, whose n-gram counts are small anyway, gets no
early skips.
"""
from __future__ import annotations

import time

import numpy as np

from ffnscope.engine.model.plan import calibration_seqs
from ffnscope.engine.record.block import BlockRunner
from ffnscope.engine.record.grams import data_counts
from ffnscope.engine.record.meta import layer_taus, parse_tau_rule
from ffnscope.engine.record.stats import ActScale, LayerStats

SKIP_MARGIN = 2.0  # "auto" skips early only what fires this many times more often than any detector can


def calibration_rows(meta: dict, n_seqs: int) -> np.ndarray:
    """Sequences of the calibration sample: spread evenly over the whole packed data (`n_seqs`, not this part's
    slice), so every part of a recording decides the same."""
    n = calibration_seqs(n_seqs, meta["recording"]["calib_tokens"], meta["data"]["seq_len"])
    return np.unique(np.linspace(0, n_seqs - 1, n).round().astype(np.int64))


class Calibration:
    """Runs the calibration's passes through `blocks`; `report(fields)` gets its progress."""

    def __init__(self, blocks: BlockRunner, meta: dict, report=None):
        self.blocks = blocks
        self.meta = meta
        self.report = report

    def calibrate(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        """On the sample of the whole packed data `tokens`: a relative rule's tau_l per layer (written into
        meta.recording.layer_taus), then the n-gram layers' neurons counted from the start (-> layer -> mask)."""
        rec = self.meta["recording"]
        rows = calibration_rows(self.meta, len(tokens))
        sample = tokens[rows]
        kind, value = parse_tau_rule(rec.get("tau_rule"))
        ngram_layers = sorted(rec["ngram_layers"])
        limit, guard = self._skip_limit(sample) if ngram_layers and rec["calib_tokens"] else (None, 0)
        passes = ([max(rec["layers"]) + 1] if kind != "absolute" else []) + \
                 ([max(ngram_layers) + 1] if ngram_layers and limit is not None else [])
        progress = _PassProgress(passes, sample.size, self.report)
        if kind != "absolute":
            taus = self._layer_taus(sample, rows, kind, value, progress)
            rec["layer_taus"] = {str(i): taus[i] for i in rec["layers"]}
            progress.next_pass()
        counted = {i: np.ones(self.meta["model"]["d_ffn"], bool) for i in ngram_layers}
        if limit is not None:
            counted.update(self._counted(sample, rows, ngram_layers, limit, guard, progress))
        return counted

    def _layer_taus(self, sample, rows, kind, value, progress) -> dict[int, float]:
        """-> layer -> tau_l of every recorded layer, from its act values on the sample (ActScale)."""
        found, d_ffn = {}, self.meta["model"]["d_ffn"]

        def scale_done(index, scale):
            found[index] = scale.tau(kind, value)
        self.blocks.run(sample, rows, self.meta["recording"]["layers"], lambda _i: ActScale(d_ffn, sample.size),
                        scale_done, progress.report)
        return found

    def _counted(self, sample, rows, layers, limit, guard, progress) -> dict[int, np.ndarray]:
        """Each n-gram layer's neurons not skipped: those firing at most `limit` of the sample's tokens, or at
        most `guard` times in it."""
        rec, d_ffn, counted = self.meta["recording"], self.meta["model"]["d_ffn"], {}

        def stats_for(index):
            tau = layer_taus(rec, index)[rec["primary_index"]]
            return LayerStats(d_ffn, sample.shape[1], [tau], 0, 1, self.blocks.device, None)

        def layer_done(index, stats):
            fires = stats.fire_count[0].cpu().numpy()
            counted[index] = ~((fires > limit * sample.size) & (fires > guard))
        self.blocks.run(sample, rows, layers, stats_for, layer_done, progress.report)
        return counted

    def _skip_limit(self, sample: np.ndarray) -> tuple[float | None, float]:
        """-> (frequency above which a neuron of the sample is skipped from the start, or None: none is; fires in
        the sample it must exceed besides). --ngram-max-freq F: F. "auto": SKIP_MARGIN x the bound's frequency,
        and the neuron must also fire more often than a detector could within the sample itself (so a neuron of
        tokens the sample happens to be rich in is kept)."""
        rec = self.meta["recording"]
        cap, bound = rec["ngram_max_freq"], rec.get("ngram_bound")
        if cap != "auto":
            return (float(cap) if cap < 1 else None), 0
        if bound is None:
            return None, 0
        limit = SKIP_MARGIN * bound["freq"]
        if limit >= 1:
            return None, 0
        from ffnscope.engine.analysis.ngrams import NgramParams, detector_fire_bound

        first_pos = 0 if self.meta["tokenizer"]["start_id"] is None else 1
        unigram, grams = data_counts(sample, self.meta["model"]["vocab_size"], first_pos)
        own = detector_fire_bound({1: unigram, **{n: g.count for n, g in grams.items()}}, len(sample),
                                  sample.shape[1], first_pos, NgramParams())
        return limit, own["fires"]


class _PassProgress:
    """The calibration's progress, like the recording's: `passes` holds each pass's layer count (its last layer
    + 1); the work is counted in layers and shown as tokens (tokens_total = the sample's tokens x passes), with
    percent, tokens/s and ETA. `report` is a BlockRunner report."""

    def __init__(self, passes: list[int], n_tokens: int, sink):
        self.passes, self.n_tokens, self.sink = passes, n_tokens, sink
        self.current = 0
        self.started = time.time()

    def next_pass(self) -> None:
        self.current += 1

    def report(self, layer: int, last: int, batch: int, n_batches: int) -> None:
        if self.sink is None:
            return
        passes = self.passes
        done = (sum(passes[:self.current]) + layer + batch / n_batches) / sum(passes)
        tokens_total = self.n_tokens * len(passes)
        tokens_done, elapsed = done * tokens_total, time.time() - self.started
        rate = tokens_done / elapsed if elapsed > 0 else 0.0
        self.sink(dict(phase="calibrating", calibration_pass=self.current + 1, calibration_passes=len(passes),
                       layer=layer, n_layers=last + 1, tokens_done=int(tokens_done), tokens_total=tokens_total,
                       percent=100.0 * done, tokens_per_s=rate,
                       eta_s=(tokens_total - tokens_done) / rate if rate > 0 else None))
