"""Recording: the layer-major streaming executor and the job around it.

For each shard (many sequences) the model's embeddings are computed once; then each layer up to
the last recorded one gets its weights onto the device once, every batch of the shard goes
through it while its statistics accumulate, and the shard's hidden states (host memory, or a
memory-mapped file when over the host budget) move on to the next layer. No logits are computed.
After each shard the whole cache is checkpointed atomically, so a killed job resumes from there.
"""
from __future__ import annotations

import os
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache import schema
from cache.errors import UserError
from cache.state import NGRAM_ORDERS, DataState, GramCounts, LayerState, RecordingState, Samples
from cache.store import read_state, write_state
from engine.budget import plan_device, plan_host
from engine.data import open_sources, pack
from engine.layer_runner import FFNProbe, LayerRunner
from cache.merge import check_same_recording
from engine.memory import release_freed_memory
from engine.meta import build_meta
from engine.models import LoadedModel, load_model
from engine.progress import COMPLETE, FAILED, STOPPED, ProgressFile, running_job
from engine.stats import BatchContext, LayerStats

EXTRA_TAUS = (0.0, 0.5, 1.0, 2.0)


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
    layers: str | None = None           # like "0-11,15"; default: all
    ngram_layers: str | None = None     # default: the recorded layers in the first half
    ngram_max_freq: float = 0.05        # n-gram counts only for neurons firing at most this often
    calib_tokens: int = 32768           # tokens that decide which neurons are that rare
    topk: int = 16
    samples: int = 2048                 # token positions whose full activation vectors are kept
    shard_tokens: int = 262144
    batch_tokens: int = 8192
    device_memory: int | None = None    # bytes for weights on the device; None: what it has
    host_memory: int | None = None      # bytes of host memory the job may use; None: most of it
    part: tuple[int, int] = (1, 1)
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False


class Stopped(Exception):
    """SIGINT/SIGTERM arrived; the last checkpoint stands and --resume continues from it."""


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
    if config.tokens <= 0:
        raise UserError("--tokens must be positive")
    if config.seq_len is not None and config.tokens < config.seq_len:
        raise UserError(f"--tokens {config.tokens} is smaller than one sequence (--seq-len {config.seq_len}); "
                        "ask for more tokens or a shorter --seq-len")
    i, n = config.part
    if not 1 <= i <= n:
        raise UserError(f"--part {i}/{n} is out of range; use i/n with 1 <= i <= n")


def model_max_len(lm: LoadedModel) -> int:
    config = lm.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 2048


def part_range(n_seqs: int, part: tuple[int, int]) -> tuple[int, int]:
    i, n = part
    return (i - 1) * n_seqs // n, i * n_seqs // n


def gram_keys(tokens: np.ndarray, vocab: int, first_pos: int) -> tuple[dict, dict]:
    """Keys of the n-gram ending at each token, and whether it avoids the start token."""
    seq_len = tokens.shape[1]
    keys, valid = {}, {}
    positions = np.arange(seq_len)
    for n in NGRAM_ORDERS:
        key = tokens.astype(np.int64)
        for shift in range(1, n):  # first token most significant, as cache.schema.encode_grams
            prev = np.zeros_like(key)
            prev[:, shift:] = tokens[:, :-shift]
            key = key + prev * vocab ** shift
        keys[n] = key
        valid[n] = np.broadcast_to(positions - n + 1 >= first_pos, tokens.shape).copy()
    return keys, valid


def data_counts(tokens: np.ndarray, vocab: int, first_pos: int) -> tuple[np.ndarray, dict[int, GramCounts]]:
    keys, valid = gram_keys(tokens, vocab, first_pos)
    unigram = np.bincount(keys[1][valid[1]], minlength=vocab).astype(np.int64)
    grams = {}
    for n in (2, 3):
        gram, count = np.unique(keys[n][valid[n]], return_counts=True)
        grams[n] = GramCounts(gram, count.astype(np.int64))
    return unigram, grams


class Recorder:
    def __init__(self, config: RecordConfig, lm: LoadedModel, meta: dict, device: torch.device, resident: int,
                 domains: np.ndarray, hidden_budget: int = 1 << 62, progress: ProgressFile | None = None,
                 on_progress=None):
        self.config = config
        self.domains = domains              # (all sequences, seq_len) domain ids of the packed data
        self.hidden_budget = hidden_budget  # bytes of hidden states kept in RAM before a mapped file
        self.spilled = False                # hidden states went to a memory-mapped file at least once
        self._mapped: Path | None = None
        self.lm = lm
        self.meta = meta
        rec = meta["recording"]
        self.layers: list[int] = rec["layers"]
        self.ngram_layers: set[int] = set(rec["ngram_layers"])
        self.taus: list[float] = rec["taus"]
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
        self.stop_flag = {"stop": False}
        self.seconds = {"statistics": 0.0, "checkpoints": 0.0}  # where recording time goes beyond the layers

    # --- one pass over a block of sequences -------------------------------------------------
    def _batches(self, n_seqs: int):
        per_batch = max(1, self.config.batch_tokens // self.seq_len)
        return [(lo, min(lo + per_batch, n_seqs)) for lo in range(0, n_seqs, per_batch)]

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
        batches = self._batches(len(tokens))
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
            hidden[lo:hi] = h.to("cpu")
            contexts.append(BatchContext(
                seq_start=seq_start[lo:hi].to(dev),
                gram_keys={n: torch.as_tensor(keys[n][lo:hi].reshape(-1)).to(dev) for n in NGRAM_ORDERS},
                gram_valid={n: torch.as_tensor(valid[n][lo:hi].reshape(-1)).to(dev) for n in NGRAM_ORDERS},
                sample_rows=torch.as_tensor(np.flatnonzero(sample_mask[lo:hi].reshape(-1))).to(dev),
                seq_len=self.seq_len))

        wanted = set(layers)
        last = max(layers)
        for index in range(last + 1):
            stats = stats_for(index) if index in wanted else None
            weights = self.runner.weights(index)
            with self.probe.attached(self.runner.layers[index]):
                for b, (lo, hi) in enumerate(batches):
                    if self.stop_flag["stop"]:
                        raise Stopped()
                    h = hidden[lo:hi].to(dev, non_blocking=True)
                    out = self.runner.run(index, h, weights)
                    g, act = self.probe.take()
                    if stats is not None:
                        t0 = time.perf_counter()
                        stats.update(g, act, contexts[b])
                        self.seconds["statistics"] += time.perf_counter() - t0
                    if index < last:
                        hidden[lo:hi] = out.to("cpu")
                    if report:
                        report(index, last, b + 1, len(batches))
            del weights
            if stats is not None:
                layer_done(index, stats)
            release_freed_memory()
        return (seq_index[:, None] * self.seq_len + np.arange(self.seq_len))[sample_mask]

    def _host_buffer(self, shape, dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        if nbytes <= self.hidden_budget:
            return torch.empty(shape, dtype=dtype)
        # over budget: hidden states live in a file the OS pages in and out
        path = Path(self.config.out).with_name(f".{Path(self.config.out).name}.{os.getpid()}.hidden")
        self._mapped = path
        self.spilled = True
        return torch.from_file(str(path), shared=True, size=int(np.prod(shape)), dtype=dtype).view(shape)

    def release_buffers(self) -> None:
        if self._mapped is not None:
            self._mapped.unlink(missing_ok=True)
            self._mapped = None

    # --- calibration: which neurons are rare enough for exact n-gram counts -----------------
    def calibrate(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        layers = sorted(self.ngram_layers)
        if not layers:
            return {}
        n = max(1, min(len(tokens), self.config.calib_tokens // self.seq_len))
        stats_for = lambda _i: LayerStats(self.d_ffn, self.seq_len, [self.taus[self.primary]], 0, 1,
                                          self.device, None)
        limit = self.meta["recording"]["ngram_max_freq"] * n * self.seq_len
        counted: dict[int, np.ndarray] = {}

        def layer_done(index, stats):
            counted[index] = (stats.fire_count[0] <= limit).cpu().numpy()

        saved_rate, self.sample_rate = self.sample_rate, 0.0
        try:
            self.run_block(tokens[:n], np.arange(n), layers, stats_for, layer_done)
        finally:
            self.sample_rate = saved_rate
        return counted

    # --- the shard loop ------------------------------------------------------------------------
    def record_shards(self, state: RecordingState, tokens: np.ndarray, seq_lo: int) -> None:
        rec = self.meta["recording"]
        per_shard = max(1, rec["shard_tokens"] // self.seq_len)
        n_shards = rec["n_shards"]
        counted = {i: state.layers[i].ngram_counted for i in self.ngram_layers}
        started, done_at_start = time.time(), state.shards_done
        for shard in range(state.shards_done, n_shards):
            lo, hi = shard * per_shard, min((shard + 1) * per_shard, len(tokens))
            block, seq_index = tokens[lo:hi], np.arange(seq_lo + lo, seq_lo + hi)

            def report(layer, last, batch, n_batches, shard=shard):
                frac_shard = (layer + batch / n_batches) / (last + 1)
                done = (shard + frac_shard) / n_shards
                elapsed = time.time() - started
                fresh = done - done_at_start / n_shards
                total = self.meta["recording"]["part_tokens"]
                rate = fresh * total / elapsed if elapsed > 0 else 0.0
                eta = (1 - done) * total / rate if rate > 0 else None
                fields = dict(phase="recording", shard=shard + 1, n_shards=n_shards, layer=layer,
                              n_layers=last + 1, tokens_done=int(done * total), tokens_total=total,
                              tokens_per_s=rate, eta_s=eta)
                if self.progress:
                    self.progress.update(**fields)
                if self.on_progress:
                    self.on_progress(fields)

            def stats_for(index):
                return LayerStats(self.d_ffn, self.seq_len, self.taus, self.primary, rec["topk"],
                                  self.device, counted.get(index))

            samples: dict[int, np.ndarray] = {}

            def layer_done(index, stats):
                samples[index] = stats.take_samples()
                state.layers[index].add(stats.to_host())

            sample_index = self.run_block(block, seq_index, self.layers, stats_for, layer_done, report)
            acts = np.stack([samples[i] for i in self.layers])
            unigram, grams = data_counts(block, self.vocab, self.first_pos)
            state.data.add(DataState(block, seq_index, self.domains[seq_index], unigram, grams))
            state.samples.add(Samples(sample_index.astype(np.int64), acts))
            state.shards_done = shard + 1
            if self.progress:
                self.progress.update(force=True, phase="checkpoint")
            t0 = time.perf_counter()
            write_state(self.config.out, state, schema.PARTIAL)
            self.seconds["checkpoints"] += time.perf_counter() - t0


def empty_state(meta: dict, counted: dict[int, np.ndarray]) -> RecordingState:
    rec, model = meta["recording"], meta["model"]
    seq_len, d_ffn, vocab = meta["data"]["seq_len"], model["d_ffn"], model["vocab_size"]
    layers = {i: LayerState.zeros(len(rec["taus"]), d_ffn, seq_len, rec["topk"], counted.get(i))
              for i in rec["layers"]}
    data = DataState(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int64), np.zeros((0, seq_len), np.uint8),
                     np.zeros(vocab, np.int64),
                     {n: GramCounts(np.zeros(0, np.int64), np.zeros(0, np.int64)) for n in (2, 3)})
    samples = Samples(np.zeros(0, np.int64), np.zeros((len(rec["layers"]), 0, d_ffn), np.float16))
    return RecordingState(meta, layers, data, samples)


def record(config: RecordConfig, command: list[str] | None = None, on_progress=None, log=print) -> RecordingState:
    """Run (or resume) a recording job to completion; raises UserError or Stopped."""
    check_output(config)
    previous = read_state(config.out, "resuming") if config.resume else None
    if previous is not None and previous.status == schema.COMPLETE:
        raise UserError(f"{config.out} is already complete; nothing to resume (use --force to record it again)")
    sources = open_sources(config.data, field=config.field, seed=config.seed)
    progress = ProgressFile(config.out, command or [])
    try:
        progress.update(force=True, phase="loading model")
        lm = load_model(config.model, config.dtype, config.trust_remote_code)
        device = resolve_device(config.device)
        seq_len = config.seq_len or min(model_max_len(lm), 2048)
        if config.tokens < seq_len:
            raise UserError(f"--tokens {config.tokens} is smaller than one sequence of {seq_len} tokens; "
                            "ask for more tokens or a shorter --seq-len")
        progress.update(force=True, phase="packing data")
        start_id, sep_id = special_ids(lm.tokenizer)
        packed = pack(sources.documents(), lm.tokenizer, seq_len, config.tokens // seq_len, start_id, sep_id)
        for note in sources.notes:
            log(f"note: {note}")
        if packed.short:
            log(f"note: the data holds only {packed.tokens.size} tokens in full sequences; recording those")
        meta = build_meta(config, lm, sources, packed, seq_len, start_id, sep_id)
        if previous is not None:
            check_same_recording(previous.meta, meta, config.out, for_resume=True)
            meta = previous.meta
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
                state = empty_state(meta, counted)
                state.vocab, state.pieces = vocabulary(lm.tokenizer, meta["model"]["vocab_size"])
                write_state(config.out, state, schema.PARTIAL)
            else:
                state = previous
            try:
                recorder.record_shards(state, packed.tokens[lo:hi], lo)
            finally:
                recorder.release_buffers()
        meta["recording"]["resident_layers"] = recorder.runner.resident
        meta["recording"]["hidden_on_disk"] = recorder.spilled
        meta["recording"]["weight_bytes_moved"] = recorder.runner.bytes_moved
        write_state(config.out, state, schema.COMPLETE)
        state.status = schema.COMPLETE
        progress.finish(COMPLETE, f"{state.n_tokens} tokens recorded")
        return state
    except Stopped:
        progress.finish(STOPPED, "stopped by signal; resume with --resume")
        raise
    except UserError as exc:
        progress.finish(FAILED, str(exc))
        raise
    except BaseException as exc:
        progress.finish(FAILED, f"{exc.__class__.__name__}: {exc}")
        raise


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
