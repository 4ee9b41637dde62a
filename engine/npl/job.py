"""NPL jobs on a recording cache: fit maps, substitution perplexity, functional neurons.

Each job reads the cache's provenance (model spec, dtype, data sources, seq_len), loads that model
and refuses another one (fingerprint), writes its output into the sidecar `<cache>.npl.h5`
(cache.npl_store) atomically, and keeps a progress file `<cache>.npl.h5.progress.json`
(engine.jobs.progress) that `ffnscope jobs` and the TUI can follow. A CLI command is a thin wrapper:
build the config, call the job, print what it returns. `on_progress(dict)` gets the same fields as
the progress file (phase, tokens_done, tokens_total, tokens_per_s, eta_s); requesting the `stop`
token (engine.jobs.stop.StopToken) stops the job at the next layer or batch (raising Stopped). Without
one, the job stops on SIGINT/SIGTERM (main thread only). A stopped job writes nothing: maps and
results are all-or-nothing (a fit does not resume; it makes one pass, or one per group of pairs where the
device's memory does not hold them all; each group's maps go to the sidecar's temporary as the group ends,
cache.npl_store.NplWriter, which replaces the sidecar only when the fit is done). Every job keeps as many
layers resident as --device-memory / --host-memory allow (ModelOptions; engine.npl.plan) and streams the
others from the model's files.

Fit data: by default the recording's own sources, field and seed, packed at the recording's seq_len; the
fit takes the first `tokens` of them (which may be the recording's own sequences). Every evaluation (the
fit's held-out metrics, substitution, functional neurons) runs on held-out sequences neither the
recording nor the fit used (engine.npl.inputs): by default the next `heldout_seqs` of the same packing
after both, else `heldout_data`; their fingerprints and size are stored in the sidecar and printed with
every figure.

Importing this module does not import torch (the CLI's --help stays light); the jobs do.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import (NplReader, NplWriter, cache_tie, map_bytes, pair_summary, sequence_hashes,
                                      sidecar_path, write_result)
from ffnscope.engine.jobs.progress import COMPLETE, ProgressFile, running_job
from ffnscope.engine.jobs.stop import Stopped, StopToken, stop_on_signals
from ffnscope.engine.npl.report import heldout_line
from ffnscope.engine.npl.inputs import (DEFAULT_FIT_TOKENS, DEFAULT_HELDOUT_SEQS, given_heldout, heldout_for,
                                        load_model_of, open_data, pack_text, plan_fit_data, recorded_sources,
                                        recording, split_fit_data, stored_heldout)


class _Job:
    """Progress file, stop token and the final status of one job."""

    def __init__(self, out: Path, command, on_progress, stop):
        pid = running_job(out)
        if pid is not None:
            raise UserError(f"another ffnscope job (pid {pid}) is writing {out}; wait for it or stop it")
        # provisional until start(): a refusal leaves none behind
        self.progress = ProgressFile(out, command or [], defer=True)
        self.on_progress = on_progress
        self.given_stop = stop

    def report(self, fields: dict) -> None:
        """Fields to the progress file (at once when the phase changes, else at most every half second)
        and to on_progress."""
        changed = fields.get("phase", self.progress.state["phase"]) != self.progress.state["phase"]
        self.progress.update(force=changed, **fields)
        if self.on_progress is not None:
            self.on_progress(fields)

    def phase(self, name: str) -> None:
        """A phase without a token count (the last phase's count and ETA do not carry over)."""
        self.report({"phase": name, "tokens_done": None, "tokens_total": None, "tokens_per_s": None, "eta_s": None})
        self.progress.update(force=True)

    def load_model(self, meta: dict, config, cache: Path, reader: NplReader | None = None):
        """The recording's model (or the one the options name), checked against the sidecar's maps."""
        self.phase("loading model")
        lm = load_model_of(meta, config, cache)
        if reader is not None:
            reader.check_model(lm.fingerprint, lm.name)
        return lm

    @contextmanager
    def running(self, done_message):
        with self.progress.outcome("stopped; nothing was written (run the job again)", (Stopped,)):
            with stop_on_signals(self.given_stop) as stop:
                yield stop
        self.progress.update(phase="done")
        self.progress.finish(COMPLETE, done_message())


def _device(name: str):
    from ffnscope.engine.model.plan import resolve_device

    return resolve_device(name)


# --- fit -----------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ModelOptions:
    """How every NPL job loads and runs the recording's model."""
    batch_tokens: int = 8192
    device: str = "auto"
    dtype: str | None = None           # default: the recording's
    model: str | None = None           # default: the recording's model spec (checked by fingerprint)
    trust_remote_code: bool = False
    allow_pickle: bool = False         # accept pickle weights (pytorch_model.bin)
    device_memory: int | None = None   # bytes of weights kept on the device; layers beyond it stream
    host_memory: int | None = None     # bytes of host memory the job may take; layers beyond it stream

    def limits(self):
        """The memory limits (engine.npl.plan.MemoryLimits), refused when not positive."""
        from ffnscope.engine.npl.plan import MemoryLimits

        limits = MemoryLimits(self.device_memory, self.host_memory)
        limits.check()
        return limits


@dataclass
class NplFitConfig(ModelOptions):
    cache: Path
    pairs: str = "adjacent"            # engine.npl.layout.parse_pairs
    method: str = "exact"              # exact | adagrad | both
    data: list[str] | None = None      # fit data; default: the recording's sources
    field: str | None = None           # default: the recording's
    tokens: int = DEFAULT_FIT_TOKENS   # fit tokens (whole sequences)
    seq_len: int | None = None         # default: the recording's
    seed: int | None = None            # document order; default: the recording's
    heldout_seqs: int = DEFAULT_HELDOUT_SEQS
    heldout_data: list[str] | None = None  # held-out text from other files; default: the fit data's sources
    ridge: float = 1e-6
    stats_dtype: str = "float64"
    memory: int | None = None          # bytes the fit's matrices may take (default: measured; engine.npl.plan)
    force: bool = False


@dataclass
class FitReport:
    path: Path
    result: object                     # engine.npl.fit.FitResult
    summary: dict                      # method -> metric (token_l2, mse, fvu) -> pair_summary averages
    lines: list[str] = field(default_factory=list)


def fit_job(config: NplFitConfig, command: list[str] | None = None, on_progress=None, stop: StopToken | None = None,
            log=print) -> FitReport:
    """Fit NPL maps for a recording cache into its sidecar; raises UserError or Stopped."""
    from ffnscope.engine.npl.fit import FitOptions, fit_maps
    from ffnscope.engine.npl.plan import plan_fit
    from ffnscope.engine.npl.layout import parse_pairs

    cache = Path(config.cache)
    limits = config.limits()
    rec = recording(cache, "fitting NPL maps")
    meta = rec.meta
    out = sidecar_path(cache)
    if out.exists() and not config.force:
        raise UserError(f"{out} exists; add --force to fit the maps again (its results go with it)")
    options = FitOptions(method=config.method, ridge=config.ridge, stats_dtype=config.stats_dtype,
                         batch_tokens=config.batch_tokens, memory=config.memory)
    options.check()
    pairs = parse_pairs(config.pairs, int(meta["model"]["n_layers"]))
    seq_len = int(config.seq_len or meta["data"]["seq_len"])
    if config.tokens < seq_len:
        raise UserError(f"--tokens {config.tokens} is less than one sequence of {seq_len}; ask for more")
    if config.heldout_seqs < 1:
        raise UserError(f"--heldout-seqs {config.heldout_seqs} must be positive")
    field_name = config.field or meta["data"]["field"]
    seed = int(meta["data"]["seed"] if config.seed is None else config.seed)
    specs = [str(s) for s in config.data or recorded_sources(meta)]
    sources = open_data(specs, field_name, seed)  # a bad file is refused before the model loads
    held_sources = open_data(config.heldout_data, field_name, seed) if config.heldout_data else None
    plan = plan_fit_data(rec, sources.describe(), field_name, seed, seq_len, config.tokens // seq_len,
                         config.heldout_seqs, held_sources is not None)
    job = _Job(out, command, on_progress, stop)
    report: dict = {}
    with job.running(lambda: report.get("message", "done")) as stop:
        lm = job.load_model(meta, config, cache)
        device = _device(config.device)
        # refuses what cannot fit before reading data
        groups = plan_fit(lm, pairs, options, device, seq_len, limits, results_kept=False)
        if len(groups) > 1:
            log(f"note: the {len(pairs)} pairs take {len(groups)} passes over the data (device memory)")
        job.phase("packing data")
        packed = pack_text(lm, sources, seq_len, plan.n_pack, log, job.report)
        fit_tokens, heldout_tokens, heldout = split_fit_data(packed.tokens, plan, rec, specs, config.heldout_seqs,
                                                             log)
        fit_hashes = sequence_hashes(fit_tokens)
        if held_sources is not None:
            job.phase("packing held-out data")
            given = pack_text(lm, held_sources, seq_len, config.heldout_seqs, log, job.report)
            heldout_tokens, heldout = given_heldout(given.tokens, config.heldout_data,
                                                    np.concatenate([rec.hashes, fit_hashes]), config.heldout_seqs,
                                                    "--heldout-seqs")
            if len(fit_tokens) < plan.n_fit:
                log(f"note: the fit data holds {len(fit_tokens)} sequences of {seq_len}; fitting on those")
        job.progress.start()  # every up-front check passed
        needs = (map_bytes(len(pairs) * len(options.methods()), lm.adapter.d_ffn)
                 + 3 * (fit_tokens.nbytes + heldout_tokens.nbytes))
        # each group's maps go into the sidecar's temporary as the group ends; it replaces the sidecar at finish
        with NplWriter(out, needs=needs) as writer:
            result = fit_maps(lm, fit_tokens, heldout_tokens, pairs, options, device, job.report, stop, groups,
                              writer, limits)
            job.phase("writing")
            data = {"sources": sources.describe(), "specs": specs, "field": field_name, "seed": seed,
                    "seq_len": seq_len, "fingerprint": packed.fingerprint(), "n_seqs": int(len(packed.tokens)),
                    "fit_seqs": int(len(fit_tokens)), "heldout_seqs": int(len(heldout_tokens)),
                    "recorded_seqs": plan.recorded}
            writer.finish(_sidecar_meta(config, meta, cache, lm, result, data, heldout, device),
                          fit_hashes, sequence_hashes(heldout_tokens), heldout_tokens, result.heldout_nll)
        with NplReader(out) as reader:
            summary = {m: {key: pair_summary(reader, m, key) for key in ("token_l2", "mse", "fvu")}
                       for m in reader.methods()}
        lines = fit_lines(result, summary, heldout)
        report["message"] = f"{len(result.pairs)} NPL maps fit on {result.fit_tokens} tokens"
    return FitReport(out, result, summary, lines)


def _sidecar_meta(config, meta, cache: Path, lm, result, data: dict, heldout: dict, device) -> dict:
    return {
        "cache": cache_tie(meta), "cache_name": cache.name,
        "model": {"name": lm.name, "spec": meta["model"]["spec"], "fingerprint": lm.fingerprint,
                  "family": lm.adapter.name, "n_layers": len(lm.adapter.layers),
                  "d_ffn": lm.adapter.d_ffn, "dtype": config.dtype or meta["model"].get("dtype", "float32")},
        "fit": {"pairs": [list(p) for p in result.pairs], "pairs_spec": config.pairs, "options": result.options,
                "data": data, "heldout": heldout,
                "fit_tokens": result.fit_tokens, "heldout_tokens": result.heldout_tokens,
                "seconds": result.seconds, "device": str(device),
                "heldout_ppl": float(np.exp(result.heldout_nll.astype(np.float64).mean()))
                if result.heldout_nll.size else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def fit_lines(result, summary: dict, heldout: dict) -> list[str]:
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())
    lines = [f"fit tokens {result.fit_tokens:,}; seconds: {seconds}", heldout_line(heldout)]
    words = {"token_l2": "L2 distance per token", "mse": "mean squared error", "fvu": "variance unexplained"}
    for method, by_key in summary.items():
        for key, groups in by_key.items():
            cells = ", ".join(f"{name.replace('_', '-')} {value:.4g}" for name, value in groups.items()
                              if value is not None)
            lines.append(f"{method}: held-out {words[key]}: {cells}")
    return lines


# --- substitution ---------------------------------------------------------------------------------------
@dataclass
class NplSubstituteConfig(ModelOptions):
    cache: Path
    heldout_data: list[str] | None = None  # default: the fit's held-out sequences
    field: str | None = None           # of heldout_data; default: the recording's
    seed: int | None = None            # document order of heldout_data; default: the recording's
    tokens: int | None = None          # at most this many held-out tokens (whole sequences; heldout_data: 16 seqs)
    chunks: str | None = None          # "1-4"
    mappings: tuple[str, ...] = ("random", "zero", "identical", "npl")
    seeds: int = 3                     # random mapping: seeds averaged
    random_scale: str = "npl"          # "npl": std of the fitted map's entries; "unit": 1/sqrt(d_ffn)
    method: str = "exact"              # which fitted maps
    explicit: bool = False             # also explicit-only substitution (engine.npl.substitute)
    finegrained: bool = False          # also the Fig. 4 grid
    fine_chunks: str | None = None     # default: the same chunks
    fine_metrics: tuple[str, ...] = ("pearson", "l2", "mean", "variance")


@dataclass
class SubstituteReport:
    original_ppl: float
    rows: list[dict]
    table: str
    fine_rows: list[dict]
    fine_table: str
    tokens: int
    tokens_per_s: dict
    heldout: dict                      # engine.npl.inputs.heldout_info


def substitute_job(config: NplSubstituteConfig, command: list[str] | None = None, on_progress=None,
                   stop: StopToken | None = None, log=print) -> SubstituteReport:
    """Table 1 (and optionally the Fig. 4 grid) for a cache with fitted maps; results go into the sidecar."""
    from ffnscope.engine.npl.layout import chunks, parse_chunks, substituted
    from ffnscope.engine.npl.plan import host_room
    from ffnscope.engine.npl.report import format_finegrained, format_table1
    from ffnscope.engine.npl.substitute import (Maps, finegrained_rows, finegrained_settings, run_settings, table1_rows,
                                       table1_settings)

    cache = Path(config.cache)
    limits = config.limits()
    rec = recording(cache, "substituting NPL maps")
    meta = rec.meta
    out = sidecar_path(cache)
    with NplReader(out) as reader:
        reader.check_cache(meta, cache)
        sources, stored = None, None
        if config.heldout_data:
            sources = open_data(config.heldout_data, config.field or meta["data"]["field"],
                                int(meta["data"]["seed"] if config.seed is None else config.seed))
        else:
            stored = stored_heldout(reader, rec, cache, config.tokens, ", or give --heldout-data FILE...")
        n_layers = int(reader.meta["model"]["n_layers"])
        chunk_numbers = parse_chunks(config.chunks)
        fine_chunks = parse_chunks(config.fine_chunks) if config.fine_chunks else chunk_numbers
        wanted = sorted({j for c in set(chunk_numbers) | (set(fine_chunks) if config.finegrained else set())
                         for j in substituted(chunks(n_layers)[c - 1])})
        need_maps = "npl" in config.mappings or config.finegrained or (
            "random" in config.mappings and config.random_scale == "npl")
        missing = [j for j in wanted if not reader.has(j - 1, j, config.method)]
        if need_maps and missing:
            raise UserError(f"{out} has no {config.method} maps M_(j-1)->j for layers {','.join(map(str, missing))}; "
                            f"fit them with `ffnscope npl fit {cache} --pairs adjacent --force`")
        job = _Job(out, command, on_progress, stop)
        report: dict = {}
        with job.running(lambda: report.get("message", "done")) as stop:
            lm = job.load_model(meta, config, cache, reader)
            if sources is not None:
                job.phase("packing held-out data")
                tokens, heldout = heldout_for(config, reader, rec, lm, sources, log, job.report)
            else:
                tokens, _nll, heldout = stored
            job.phase("reading maps")
            maps = (Maps.from_reader(reader, wanted, config.method, need_metrics=config.finegrained)
                    if need_maps else None)
            if maps is not None:
                maps.check_model(lm)
            device = _device(config.device)
            host_room(lm, device, limits, tokens.shape[1], config.batch_tokens)  # before start: refused, no file
            job.progress.start()  # every up-front check passed
            job.phase("preparing settings")
            settings = table1_settings(n_layers, maps, chunk_numbers, config.mappings, config.seeds,
                                       config.random_scale)
            fine = (finegrained_settings(n_layers, maps, fine_chunks, config.fine_metrics, seeds=config.seeds,
                                         random_scale=config.random_scale) if config.finegrained else [])
            result = run_settings(lm, tokens, settings + fine, device, config.batch_tokens, job.report, stop,
                                  explicit=config.explicit, limits=limits, maps=maps)
            part = lambda outs: type(result)(result.original_nll, result.tokens, outs, result.seconds)  # noqa: E731
            result_t1, result_fine = part(result.outcomes[:len(settings)]), part(result.outcomes[len(settings):])
            rows, fine_rows = table1_rows(result_t1), finegrained_rows(result_fine) if fine else []
            # tokens/s of the unmodified pass (every layer and the LM head), and of the substituted passes
            # (each from its chunk's first layer, both losses): the cost of one more setting per token
            plain = result.tokens / max(result.seconds["original"], 1e-9)
            subst = sum(o.tokens for o in result.outcomes) / max(result.seconds["substituted"], 1e-9)
            params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()
                      if k not in ("cache", "device", "model", "trust_remote_code", "allow_pickle", "batch_tokens",
                                    "device_memory", "host_memory")}
            params.update(heldout=heldout, heldout_tokens=int(result.tokens), chunks=chunk_numbers,
                          chunk_layers=[chunks(n_layers)[c - 1] for c in chunk_numbers],
                          layer0="kept actual (no previous layer)", original_ppl=result.original_ppl,
                          tokens_per_s={"plain": plain, "substitution": subst})
            job.phase("writing")
            write_result(out, "substitution", params, rows)
            if fine:
                write_result(out, "finegrained", {**params, "chunks": fine_chunks}, fine_rows)
            report["message"] = f"substitution perplexity on {result.tokens} held-out tokens"
        return SubstituteReport(result.original_ppl, rows, format_table1(rows, result.original_ppl), fine_rows,
                                format_finegrained(fine_rows, result.original_ppl) if fine else "",
                                result.tokens, {"plain": plain, "substitution": subst}, heldout)


# --- functional and background neurons ----------------------------------------------------------------
@dataclass
class NplFunctionalConfig(ModelOptions):
    cache: Path
    method: str = "exact"
    theta: float = 0.5
    top_ngrams: int = 100
    min_count: int = 20
    loss_fraction: float = 0.1
    tokens: int | None = None          # at most this many of the stored held-out tokens


@dataclass
class FunctionalReport:
    rows: list[dict]
    table: str
    background_frac: dict[int, float]
    heldout: dict                      # engine.npl.inputs.heldout_info


def functional_job(config: NplFunctionalConfig, command: list[str] | None = None, on_progress=None,
                   stop: StopToken | None = None, log=print) -> FunctionalReport:
    """Functional neurons' predictability and background neurons on the fit run's held-out tokens."""
    from ffnscope.engine.npl.columns import layer_scores
    from ffnscope.engine.npl.functional import FunctionalParams, functional_neurons
    from ffnscope.engine.npl.plan import host_room

    cache = Path(config.cache)
    limits = config.limits()
    rec = recording(cache, "finding functional neurons")
    meta = rec.meta
    out = sidecar_path(cache)
    params = FunctionalParams(theta=config.theta, top_ngrams=config.top_ngrams, min_count=config.min_count,
                              loss_fraction=config.loss_fraction)
    with NplReader(out) as reader:
        reader.check_cache(meta, cache)
        scores = {layer: l2 for layer, (_r, l2) in layer_scores(reader, config.method).items()}
        if not scores:
            raise UserError(f"{out} has no {config.method} map between two different layers; fit some with "
                            f"`ffnscope npl fit {cache} --force`")
        tokens, nll, heldout = stored_heldout(reader, rec, cache, config.tokens, "")
        job = _Job(out, command, on_progress, stop)
        report: dict = {}
        with job.running(lambda: report.get("message", "done")) as stop:
            lm = job.load_model(meta, config, cache, reader)
            host_room(lm, _device(config.device), limits, tokens.shape[1], config.batch_tokens)
            job.progress.start()  # every up-front check passed
            result = functional_neurons(lm, tokens, nll, scores, params, _device(config.device), config.batch_tokens,
                                        job.report, stop, limits)
            layers = result.layers
            arrays = {"layers": np.asarray(layers, np.int64),
                      "background": np.stack([result.background[k] for k in layers]),
                      "score": np.stack([np.asarray(result.score[k], np.float64) for k in layers]),
                      "s_all": np.asarray([result.s_all[k] for k in layers]),
                      "s_random": np.asarray([result.s_random[k] for k in layers])}
            job.phase("writing")
            write_result(out, "functional", {**result.params, "method": config.method, "heldout": heldout,
                                             "heldout_tokens": int(tokens.size)}, result.rows, arrays)
            report["message"] = f"functional neurons on {tokens.size} held-out tokens"
    from ffnscope.engine.npl.report import format_functional

    return FunctionalReport(result.rows, format_functional(result.rows),
                            {k: float(result.background[k].mean()) for k in result.layers}, heldout)
