"""Recording jobs: settings, checks, and the run around the layer-major executor
(engine.streaming): load, pack, calibrate, record shards with checkpoints, finish or stop cleanly."""
from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import check_same_recording
from ffnscope.cache.state import DataState, GramCounts, LayerState, RecordingState, Samples
from ffnscope.cache.store import read_state, write_state
from ffnscope.engine.analysis.ngrams import NgramParams, detector_fire_bound, skip_status
from ffnscope.engine.budget import plan_device, plan_host
from ffnscope.engine.data import open_sources, pack
from ffnscope.engine.memory import release_freed_memory
from ffnscope.engine.meta import build_meta, parse_layers, parse_tau_rule, part_range
from ffnscope.engine.models import LoadedModel, load_model
from ffnscope.engine.progress import COMPLETE, ProgressFile, running_job
from ffnscope.engine.streaming import Recorder, Stopped, data_counts

@dataclass
class RecordConfig:
    out: Path
    model: str = "default"
    data: list[str] = field(default_factory=lambda: ["builtin"])
    tokens: int = 1_000_000
    seq_len: int | None = None          # default: min(model maximum, 2048)
    seed: int = 0
    field: str = "text"
    dtype: str = "float32"
    device: str = "auto"
    tau: float | None = None            # default: 0 for ReLU models, 1.0 for smooth activations
    tau_rule: str = "absolute"          # or per layer: "quantile:Q", "median-max:F" (engine.meta.parse_tau_rule)
    layers: str | None = None           # like "0-11,15"; default: all
    ngram_layers: str | None = None     # default: the recorded layers in the first half
    ngram_max_freq: float | None = None  # None ("auto"): count every neuron that can be a detector;
                                         # F: every neuron firing at most that often (1: every neuron)
    calib_tokens: int = 32768           # tokens of the calibration sample (relative taus, early skips)
    topk: int = 16
    samples: int = 2048                 # token positions whose full activation vectors are kept
    shard_tokens: int | None = None     # default: default_shard_tokens (a quarter of the recording, <= 262144)
    batch_tokens: int = 8192
    device_memory: int | None = None    # bytes for weights on the device; None: what it has
    host_memory: int | None = None      # bytes of host memory the job may use; None: most of it
    part: tuple[int, int] = (1, 1)
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False          # accept pickle weights (pytorch_model.bin)


@contextmanager
def _stop_on_signals():
    flag = {"stop": False}

    def handler(signum, _frame):
        flag["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but this torch sees no CUDA GPU; use --device cpu")
    return device


def check_output(config: RecordConfig) -> None:
    out = Path(config.out)
    pid = running_job(out)
    if pid is not None:
        raise UserError(f"another ffnscope job (pid {pid}) is recording into {out}; wait for it, stop it, "
                        "or choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output directory does not exist: {parent}; create it or choose another --out")
    try:  # really try: permission bits alone say nothing for root or read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".ffnscope-probe-"):
            pass
    except OSError:
        raise UserError(f"cannot write to {parent}; choose a writable --out") from None
    if out.exists() and not (config.resume or config.force):
        raise UserError(f"{out} exists; add --resume to continue it or --force to overwrite it")
    if config.resume and not out.exists():
        raise UserError(f"nothing to resume: {out} does not exist; drop --resume to start a recording")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the cache file to write, like {out / 'recording.h5'}")
    _check_numbers(config)
    if config.seq_len is not None and config.tokens < config.seq_len:
        raise UserError(f"--tokens {config.tokens} is smaller than one sequence (--seq-len {config.seq_len}); "
                        "ask for more tokens or a shorter --seq-len")
    i, n = config.part
    if not 1 <= i <= n:
        raise UserError(f"--part {i}/{n} is out of range; use i/n with 1 <= i <= n")
    if config.ngram_max_freq is not None and not 0 < config.ngram_max_freq <= 1:
        raise UserError("--ngram-max-freq must be a fraction in (0, 1] (or auto, the default)")
    if parse_tau_rule(config.tau_rule)[0] != "absolute" and config.tau is not None:
        raise UserError("--tau sets an absolute threshold; leave it out with a relative --tau-rule "
                        "(fire counts at 0, 0.5, 1 and 2 are recorded beside the relative rule anyway)")
    for option, text in (("--layers", config.layers), ("--ngram-layers", config.ngram_layers)):
        parse_layers(text, 1 << 30, option)  # the syntax here; the range once the model's config is read
    check_model_config(config)


def _check_numbers(config: RecordConfig) -> None:
    """The numeric settings (the CLI's argument types check them too; this covers the Python API)."""
    import math

    checks = [("--tokens", config.tokens, 1), ("--seq-len", config.seq_len, 2), ("--topk", config.topk, 1),
              ("--samples", config.samples, 0), ("--shard-tokens", config.shard_tokens, 1),
              ("--batch-tokens", config.batch_tokens, 1), ("--calib-tokens", config.calib_tokens, 1),
              ("--seed", config.seed, 0)]
    for option, value, low in checks:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low):
            raise UserError(f"{option} {value} is not allowed; give a whole number of at least {low}")
    if config.tau is not None and not (isinstance(config.tau, (int, float)) and math.isfinite(config.tau)):
        raise UserError(f"--tau {config.tau} is not a finite number")


def model_config_file(spec: str) -> Path | None:
    """The config.json of a model directory or of a hub id in the local HF cache (None for 'default',
    a .gguf file, or what is not there: load_model says what is wrong with those)."""
    if spec == "default":
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path / "config.json" if (path / "config.json").is_file() else None
    if path.exists() or spec.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id: load_model says so
        return None
    return Path(found) if isinstance(found, str) else None


def check_model_config(config: RecordConfig) -> None:
    """What the model's config.json alone refuses, read as JSON before any model is loaded: remote code
    without --trust-remote-code, --seq-len above its maximum positions, layers it does not have."""
    import json

    path = model_config_file(config.model)
    if path is None:
        return
    try:
        model_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model's configuration {path}: {exc}") from None
    if not isinstance(model_config, dict):
        raise UserError(f"the model's configuration {path} is not a JSON object")
    text = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else {}
    get = lambda key: model_config.get(key, text.get(key))  # noqa: E731
    if model_config.get("auto_map") and not config.trust_remote_code and not _builtin_type(get("model_type")):
        raise UserError(f"{config.model} needs code from the model's own files (auto_map in its config.json); "
                        "add --trust-remote-code if you trust them")
    longest = next((get(k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                    if isinstance(get(k), int) and get(k) > 0), None)
    if longest is not None and config.seq_len is not None and config.seq_len > longest:
        raise UserError(f"--seq-len {config.seq_len} is above the model's maximum of {longest} positions; "
                        f"use --seq-len {longest} or less")
    n_layers = next((get(k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                     if isinstance(get(k), int) and get(k) > 0), None)
    if n_layers is not None:
        recorded = parse_layers(config.layers, n_layers, "--layers")
        ngram = parse_layers(config.ngram_layers, n_layers, "--ngram-layers")
        if recorded is not None and ngram is not None and not set(ngram) <= set(recorded):
            raise UserError("--ngram-layers must be among the recorded --layers")


def _builtin_type(model_type) -> bool:
    """Whether transformers has its own classes for this model_type (then auto_map is not needed)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return True
    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def default_shard_tokens(tokens: int, seq_len: int) -> int:
    """Shards are the unit of checkpoints: a quarter of the recording (whole sequences), so a stopped
    small recording keeps most of its work, and at most 262144 tokens, so a big one checkpoints often."""
    return max(seq_len, min(262144, tokens // 4) // seq_len * seq_len)


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
    samples = Samples(np.zeros(0, np.int64), np.zeros((len(rec["layers"]), 0, d_ffn), np.float16))
    return RecordingState(meta, layers, data, samples)


def record(config: RecordConfig, command: list[str] | None = None, on_progress=None, log=print,
           after=None) -> RecordingState:
    """Run (or resume) a recording job to completion; raises UserError or Stopped.

    `after(state, progress)`, if given, runs once the cache is written complete, while the progress
    file still says running (the CLI's `record --analyze` runs the analyses there). If it raises, the
    complete recording stands and the progress file says failed (or stopped, for a signal)."""
    check_output(config)
    previous = read_state(config.out, "resuming") if config.resume else None
    if previous is not None and previous.status == schema.COMPLETE:
        raise UserError(f"{config.out} is already complete; nothing to resume (use --force to record it again)")
    sources = open_sources(config.data, field=config.field, seed=config.seed)
    progress = ProgressFile(config.out, command or [])
    recorded = False

    def stopped() -> str:
        return (f"stopped by signal after the recording was complete; run `ffnscope analyze {config.out}` for "
                "the analyses" if recorded else "stopped by signal; resume with --resume")

    with progress.outcome(stopped, (Stopped,)):
        progress.update(force=True, phase="loading model", cwd=os.getcwd())
        lm = load_model(config.model, config.dtype, config.trust_remote_code, config.allow_pickle)
        device = resolve_device(config.device)
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
        for note in sources.notes:
            log(f"note: {note}")
        if packed.short:
            log(f"note: --tokens {config.tokens:,} asked, but the data holds only {packed.tokens.size:,} tokens in "
                f"full sequences of {seq_len}; recording those")
        elif config.tokens % seq_len:
            log(f"note: recording {packed.tokens.size:,} tokens: --tokens {config.tokens:,} rounded down to whole "
                f"sequences of {seq_len}")
        if config.shard_tokens is None:  # a resumed run keeps the shards it was cut into
            config = replace(config, shard_tokens=previous.meta["recording"]["shard_tokens"] if previous is not None
                             else default_shard_tokens(int(packed.tokens.size), seq_len))
        meta = build_meta(config, lm, sources, packed, seq_len, start_id, sep_id)
        if previous is not None:
            check_same_recording(previous.meta, meta, config.out, for_resume=True)
            meta = previous.meta
        elif meta["recording"]["ngram_layers"]:
            meta["recording"]["ngram_bound"] = ngram_bound(packed.tokens, meta)
        lo, hi = part_range(len(packed.tokens), config.part)
        if hi <= lo:
            raise UserError(f"part {config.part[0]}/{config.part[1]} gets no sequence of the "
                            f"{len(packed.tokens)}; use fewer parts or more --tokens")
        resident = plan_device(config.device_memory, lm, device, config.batch_tokens)
        recorder = Recorder(config, lm, meta, device, resident, packed.domains,
                            plan_host(config.host_memory, lm, meta), progress, on_progress)
        with _stop_on_signals() as flag:
            recorder.stop_flag = flag
            if previous is None:
                progress.update(force=True, phase="calibrating")
                counted = recorder.calibrate(packed.tokens)
                release_freed_memory()
                rec = meta["recording"]
                if rec["tau_rule"] != "absolute":
                    log(f"note: firing thresholds tau_l ({rec['tau_rule']}): " +
                        ", ".join(f"layer {i} {rec['layer_taus'][str(i)]:g}" for i in rec["layers"]))
                state = empty_state(meta, counted)
                state.vocab, state.pieces = vocabulary(lm.tokenizer, meta["model"]["vocab_size"])
                write_state(config.out, state, schema.PARTIAL)
            else:
                state = previous
            try:
                recorder.record_shards(state, packed.tokens[lo:hi], lo)
            finally:
                recorder.release_buffers()
        for line in skip_notes(state):
            log(f"note: {line}")
        meta["recording"]["resident_layers"] = recorder.runner.resident
        meta["recording"]["hidden_on_disk"] = recorder.spilled
        meta["recording"]["weight_bytes_moved"] = recorder.runner.bytes_moved
        write_state(config.out, state, schema.COMPLETE)
        state.status = schema.COMPLETE
        recorded = True
        total = meta["recording"]["part_tokens"]
        progress.update(force=True, tokens_done=total, tokens_total=total, eta_s=0.0)
        if after is not None:
            after(state, progress)
        progress.update(phase="done")
        progress.finish(COMPLETE, f"{state.n_tokens} tokens recorded" +
                        (f" (all the data holds; {config.tokens} asked)" if packed.short else ""))
        return state


def ngram_bound(tokens: np.ndarray, meta: dict, chunk_seqs: int = 4096) -> dict:
    """The most fires a detector can have over the whole packed data (every part's), from the data's
    n-gram occurrence counts (engine.analysis.ngrams.detector_fire_bound, the default analysis
    parameters). Counted in chunks of sequences, so no tokens x 3 key array is ever held."""
    vocab = meta["model"]["vocab_size"]
    first_pos = 0 if meta["tokenizer"]["start_id"] is None else 1
    unigram, grams = np.zeros(vocab, np.int64), None
    for lo in range(0, len(tokens), chunk_seqs):
        u, g = data_counts(tokens[lo:lo + chunk_seqs], vocab, first_pos)
        unigram += u
        grams = g if grams is None else {n: GramCounts.reduce([grams[n], g[n]]) for n in g}
    counts = {1: unigram, **{n: grams[n].count for n in grams}}
    return detector_fire_bound(counts, len(tokens), tokens.shape[1], first_pos, NgramParams())


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


def special_ids(tokenizer) -> tuple[int | None, int | None]:
    """Start-of-sequence token (BOS, else EOS) and document separator (EOS, else BOS)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos if bos is not None else eos), (eos if eos is not None else bos)
