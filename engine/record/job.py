"""A recording job: load, pack, calibrate, record shards with checkpoints (the layer-major executor,
executor.py), finish or stop cleanly (the complete cache written compressed, the checkpoint's segment
files removed)."""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import check_same_recording
from ffnscope.cache.provenance import weights_note
from ffnscope.cache.runs import CachePairs
from ffnscope.cache.state import DataState, GramCounts, LayerState, RecordingState, Samples
from ffnscope.cache.store import read_state, remove_segments, write_state
from ffnscope.engine.analysis.ngrams import NgramParams, detector_fire_bound, skip_status
from ffnscope.engine.data.packing import pack, special_ids
from ffnscope.engine.data.sources import open_sources
from ffnscope.engine.jobs.launcher import cache_status
from ffnscope.engine.jobs.progress import COMPLETE, ProgressFile
from ffnscope.engine.jobs.stop import Stopped, stop_on_signals
from ffnscope.engine.model import accelerator
from ffnscope.engine.model.load import LoadedModel, load_model
from ffnscope.engine.model.plan import plan_memory, release_freed_memory, resolve_device
from ffnscope.engine.record.config import (RecordConfig, auto_device, check_host_memory, check_output,
                                           default_shard_tokens)
from ffnscope.engine.record.executor import Recorder
from ffnscope.engine.record.grams import data_counts
from ffnscope.engine.record.meta import build_meta, part_range


def model_max_len(lm: LoadedModel) -> int:
    config = lm.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 2048


def empty_state(meta: dict, counted: dict[int, np.ndarray]) -> RecordingState:
    rec, model = meta["recording"], meta["model"]
    seq_len, d_ffn, vocab = meta["data"]["seq_len"], model["d_ffn"], model["vocab_size"]
    n_rows = max(len(rec["taus"]), rec["primary_index"] + 1)  # a relative rule's per-layer tau is one row more
    layers = {i: LayerState.zeros(n_rows, d_ffn, seq_len, rec["topk"], counted.get(i))
              for i in rec["layers"]}
    data = DataState(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int64), np.zeros((0, seq_len), np.uint8),
                     np.zeros(vocab, np.int64),
                     {n: GramCounts(np.zeros(0, np.int64), np.zeros(0, np.int64)) for n in (2, 3)})
    samples = Samples(np.zeros(0, np.int64), np.zeros((len(rec["layers"]), 0, d_ffn), Samples.DTYPE))
    return RecordingState(meta, layers, data, samples)


def record(config: RecordConfig, command: list[str] | None = None, on_progress=None, log=print,
           after=None) -> RecordingState:
    """Run (or resume) a recording job to completion; raises UserError or Stopped.

    `after(state, progress, lm)`, if given, runs once the cache is written complete, while the progress
    file still says running (the CLI's `record --analyze` runs the analyses there, with the loaded model
    `lm`). If it raises, the complete recording stands and the progress file says failed (or stopped, for a
    signal)."""
    check_output(config)
    # without the n-gram pairs: the recorder carries them over from the checkpoint's runs, streamed
    previous = read_state(config.out, "resuming", pairs=False) if config.resume else None
    if previous is not None and previous.status == schema.COMPLETE:
        raise UserError(f"{config.out} is already complete; nothing to resume (use --force to record it again)")
    sources = open_sources(config.data, field=config.field, seed=config.seed)
    # written once every check below passed (start()): a refused command leaves no progress file behind
    progress = ProgressFile(config.out, command or [], defer=True)
    recorded = False

    def stopped() -> str:
        if recorded:
            return (f"stopped by signal after the recording was complete; run `ffnscope analyze {config.out}` "
                    "for the analyses")
        if cache_status(config.out) == schema.PARTIAL:  # the first is written as the recording starts
            return "stopped by signal; resume with --resume"
        return "stopped by signal before the first checkpoint; nothing to resume, start it again"

    with progress.outcome(stopped, (Stopped,)):
        progress.update(force=True, phase="loading model", cwd=os.getcwd())
        lm = load_model(config.model, config.dtype, config.trust_remote_code, config.allow_pickle)
        # auto under torchrun: this rank's GPU (LOCAL_RANK), made current so no rank opens a context on GPU 0
        count = accelerator.runtime.device_count()
        device = resolve_device(auto_device(os.environ, count) if config.device == "auto" else config.device)
        if device.type == "cuda" and device.index is not None:
            accelerator.runtime.set_device(device)
        longest = model_max_len(lm)
        declared = any(getattr(lm.config, k, None) for k in ("max_position_embeddings", "n_positions", "n_ctx"))
        if declared and config.seq_len is not None and config.seq_len > longest:
            raise UserError(f"--seq-len {config.seq_len} is above the model's maximum of {longest} positions; "
                            f"use --seq-len {longest} or less")
        seq_len = config.seq_len or min(longest, 2048)
        if config.tokens < seq_len:
            raise UserError(f"--tokens {config.tokens} is smaller than one sequence of {seq_len} tokens; "
                            "ask for more tokens or a shorter --seq-len")
        progress.update(force=True, phase="packing data")
        start_id, sep_id = special_ids(lm.tokenizer)
        packed = pack(sources.documents(), lm.tokenizer, seq_len, config.tokens // seq_len, start_id, sep_id)
        if config.shard_tokens is None:  # a resumed run keeps the shards it was cut into
            config = replace(config, shard_tokens=previous.meta["recording"]["shard_tokens"] if previous is not None
                             else default_shard_tokens(int(packed.tokens.size), seq_len, config.batch_tokens))
        meta = build_meta(config, lm, sources, packed, seq_len, start_id, sep_id)
        if previous is not None:
            check_same_recording(previous.meta, meta, config.out, for_resume=True)
            meta = previous.meta
        elif meta["recording"]["ngram_layers"]:
            meta["recording"]["ngram_bound"], meta["recording"]["distinct_grams"] = ngram_bound(packed.tokens, meta)
        lo, hi = part_range(len(packed.tokens), config.part)
        if hi <= lo:
            raise UserError(f"part {config.part[0]}/{config.part[1]} gets no sequence of the "
                            f"{len(packed.tokens)}; use fewer parts or more --tokens")
        memory = plan_memory(config.device_memory, config.host_memory, lm, meta, device, config.batch_tokens)
        check_host_memory(lm, meta, memory, device.type)
        progress.start()  # every up-front check passed
        if weights_note(lm.weights_from):  # weights dequantized from a GGUF: the job's log says so as info does
            log(f"note: model {lm.name}, {weights_note(lm.weights_from)}")
        for note in sources.notes:
            log(f"note: {note}")
        if packed.short:
            log(f"note: --tokens {config.tokens:,} asked, but the data holds only {packed.tokens.size:,} tokens in "
                f"full sequences of {seq_len}; recording those")
        elif config.tokens % seq_len:
            log(f"note: recording {packed.tokens.size:,} tokens: --tokens {config.tokens:,} rounded down to whole "
                f"sequences of {seq_len}")
        recorder = Recorder(config, lm, meta, device, memory.resident, packed.domains, memory.hidden_bytes, progress,
                            on_progress, hidden_on_device=memory.hidden_on_device)
        with stop_on_signals() as stop:
            recorder.stop = stop
            if previous is None:
                progress.update(force=True, phase="calibrating")
                counted = recorder.calibrate(packed.tokens)
                release_freed_memory()
                rec = meta["recording"]
                if rec["tau_rule"] != "absolute":
                    log(f"note: firing thresholds tau_l ({rec['tau_rule']}): " +
                        ", ".join(f"layer {i} {rec['layer_taus'][str(i)]:g}" for i in rec["layers"]))
                state = empty_state(meta, counted)  # its first checkpoint: Recorder.record_shards
                state.vocab, state.pieces = vocabulary(lm.tokenizer, meta["model"]["vocab_size"])
            else:
                state = previous
                log(f"note: resuming {config.out} after its last checkpoint: {state.shards_done} of "
                    f"{meta['recording']['n_shards']} shards done, recording from shard {state.shards_done + 1}")
            before, started = state.n_tokens, time.perf_counter()
            try:
                recorder.record_shards(state, packed.tokens[lo:hi], lo)
            finally:
                recorder.release_buffers()
            seconds = time.perf_counter() - started
        for line in skip_notes(state):
            log(f"note: {line}")
        meta["recording"]["resident_layers"] = recorder.runner.resident
        meta["recording"]["hidden_on_disk"] = recorder.spilled
        meta["recording"]["weight_bytes_moved"] = recorder.runner.bytes_moved
        # this run's speed over the recorded layers (checkpoints included): what the app's dialogs estimate from
        meta["recording"]["tokens_per_s"] = (state.n_tokens - before) / seconds if state.n_tokens > before else None
        write_complete(config.out, state, recorder)
        recorded = True
        total = meta["recording"]["part_tokens"]
        progress.update(force=True, tokens_done=total, tokens_total=total, eta_s=0.0)
        if after is not None:
            if stop.after_shard:  # asked to stop during the last shard: the recording is whole, stop before more
                raise Stopped()
            after(state, progress, lm)
        progress.update(phase="done")
        progress.finish(COMPLETE, f"{state.n_tokens} tokens recorded" +
                        (f" (all the data holds; {config.tokens} asked)" if packed.short else ""))
        return state


def write_complete(out: Path, state: RecordingState, recorder: Recorder) -> None:
    """The recording's final write: compressed, every stream in the file itself, the n-gram pairs merged
    from the segments' runs; then the segments go, and `state` reads its pairs from the file when asked."""
    try:
        write_state(out, state, schema.COMPLETE, runs=recorder.segments)
    except Exception:
        recorder.drop_unnamed()  # the last checkpoint stands, and only its segments
        raise
    remove_segments(out)  # the checkpoint's segments (cache.store), named by no cache now
    for index, layer in state.layers.items():
        if layer.ngram_counted is not None:
            layer.ngrams = CachePairs(out, index)
    state.status = schema.COMPLETE


def ngram_bound(tokens: np.ndarray, meta: dict, chunk_seqs: int = 4096) -> tuple[dict, int]:
    """The most fires a detector can have over the whole packed data (every part's), from the data's
    n-gram occurrence counts (engine.analysis.ngrams.detector_fire_bound, the default analysis
    parameters), and the data's distinct 2- and 3-grams (the memory plan charges their tables). Counted in
    chunks of sequences, so no tokens x 3 key array is ever held."""
    vocab = meta["model"]["vocab_size"]
    first_pos = 0 if meta["tokenizer"]["start_id"] is None else 1
    unigram, grams = np.zeros(vocab, np.int64), None
    for lo in range(0, len(tokens), chunk_seqs):
        u, g = data_counts(tokens[lo:lo + chunk_seqs], vocab, first_pos)
        unigram += u
        grams = g if grams is None else {n: GramCounts.reduce([grams[n], g[n]]) for n in g}
    counts = {1: unigram, **{n: grams[n].count for n in grams}}
    distinct = sum(len(grams[n].gram) for n in grams)
    return detector_fire_bound(counts, len(tokens), tokens.shape[1], first_pos, NgramParams()), distinct


def skip_notes(state: RecordingState) -> list[str]:
    """What became of the n-gram counts, one line per kind of skip, for the log."""
    rec = state.meta["recording"]
    bound = rec.get("ngram_bound")
    total = {"counted": 0, "proven": 0, "unproven": 0}
    for index in rec["ngram_layers"]:
        layer = state.layers[index]
        if layer.ngram_counted is not None:
            for key, value in skip_status(layer.ngram_counted, layer.fire_count[rec["primary_index"]], bound).items():
                total[key] += value
    lines = []
    if total["proven"] and bound:
        lines.append(f"n-grams: {total['proven']} neurons fire more often than any detector can "
                     f"(> {bound['fires']:,} fires); their n-gram counts were not kept")
    if total["unproven"]:
        cap = rec["ngram_max_freq"]
        why = "the calibration sample" if cap == "auto" else f"--ngram-max-freq {cap:g}"
        lines.append(f"n-grams: {total['unproven']} neurons were left out by {why} but fire few enough times to "
                     "be detectors; they get no detector verdict (--ngram-max-freq 1 counts every neuron)")
    return lines


def vocabulary(tokenizer, size: int) -> tuple[list[str], list[str]]:
    """Each token id's decoded text and raw piece, so tables show tokens without a tokenizer.
    Ids past the tokenizer (padded embedding rows) get empty strings."""
    n = min(size, len(tokenizer))
    vocab = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    pieces = [p or "" for p in tokenizer.convert_ids_to_tokens(list(range(n)))]
    pad = [""] * (size - n)
    return vocab + pad, pieces + pad


