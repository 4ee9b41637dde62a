"""A recording's settings and the checks they pass before any model is loaded: numbers, the output
path, and what the model's config.json alone can refuse (remote code, positions, layers); and what a
launcher's environment decides (torchrun, Slurm arrays): --part auto, {part} in --out, --device auto."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.engine.jobs.progress import running_job
from ffnscope.engine.record.meta import parse_layers, parse_ranges, parse_tau_rule


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
    tau_rule: str = "absolute"          # or per layer: "quantile:Q", "median-max:F" (meta.parse_tau_rule)
    layers: str | None = None           # like "0-11,15"; default: all
    ngram_layers: str | None = None     # default: the recorded layers in the first half
    ngram_max_freq: float | None = None  # None ("auto"): count every neuron that can be a detector;
                                         # F: every neuron firing at most that often (1: every neuron)
    calib_tokens: int | None = None     # the calibration sample (relative taus, early skips); default_calib_tokens
    topk: int = 16
    samples: int = 2048                 # token positions whose full activation vectors are kept
    shard_tokens: int | None = None     # default: default_shard_tokens (a quarter of the recording)
    batch_tokens: int = 8192
    device_memory: int | None = None    # bytes for weights on the device; None: what it has
    host_memory: int | None = None      # bytes of host memory the job may use; None: most of it
    part: tuple[int, int] = (1, 1)
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False          # accept pickle weights (pytorch_model.bin)


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
    if isinstance(config.part, str):  # "auto" is the command line's; the Python API takes (i, n)
        raise UserError(f"part {config.part!r} is not (i, n); auto_part(os.environ) gives a launcher's part")
    i, n = config.part
    if not 1 <= i <= n:
        raise UserError(f"--part {i}/{n} is out of range; use i/n with 1 <= i <= n")
    if config.ngram_max_freq is not None and not 0 < config.ngram_max_freq <= 1:
        raise UserError("--ngram-max-freq must be a fraction in (0, 1] (or auto, the default)")
    if parse_tau_rule(config.tau_rule)[0] != "absolute" and config.tau is not None:
        raise UserError("--tau sets an absolute threshold; leave it out with a relative --tau-rule "
                        "(fire counts at 0, 0.5, 1 and 2 are recorded beside the relative rule anyway)")
    for option, text in (("--layers", config.layers), ("--ngram-layers", config.ngram_layers)):
        if text is not None:
            parse_ranges(text, option)  # the syntax here; the range once the model's config is read
    check_model_config(config)
    check_token_memory(config.tokens)


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


def physical_memory() -> int:
    """This machine's memory in bytes (or its container's limit, when lower); 0 when unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 0
    try:  # cgroup v2: "max" or a number
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit() and (not total or int(limit) < total):
            total = int(limit)
    except OSError:
        pass
    return total


def available_memory() -> int:
    """Host memory available now without swapping (MemAvailable), in bytes; 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_token_memory(tokens: int) -> None:
    """--tokens against this machine's memory, before any data is read: a recording holds every token it
    packs twice (the packed data and the recorded streams, engine.model.plan.TOKEN_BYTES a token)."""
    from ffnscope.engine.model.plan import TOKEN_BYTES  # torch: the recording imports it next anyway
    from ffnscope.engine.units import human

    have, per_token = physical_memory(), 2 * TOKEN_BYTES
    if have and tokens * per_token > have:
        raise UserError(f"--tokens {tokens:,} would hold {human(tokens * per_token)} of token streams in memory, "
                        f"more than this machine's {human(have)}; record at most {have // per_token:,} tokens")


def check_host_memory(lm, meta: dict, memory, device_kind: str) -> None:
    """What a recording is about to allocate on the host (statistics, samples, token streams, a shard's hidden
    states when they stay in memory: engine.model.plan's arithmetic, less the runtime already running) against
    the memory available now, before any of it is allocated: one line naming the setting that asks for most."""
    from dataclasses import replace

    from ffnscope.engine.model.plan import RUNTIME_BYTES, host_other_bytes, record_sizes
    from ffnscope.engine.units import human

    have = available_memory()
    r = record_sizes(lm, meta)
    r = replace(r, samples=min(r.samples, r.tokens))  # at most one a token is drawn
    need = lambda sizes: host_other_bytes(sizes, device_kind) - RUNTIME_BYTES  # noqa: E731
    base = need(r)
    total = base + memory.hidden_host_bytes
    if not have or total <= have:
        return
    rec = meta["recording"]
    least = {  # each setting at its least; the one whose cut saves most is named
        (f"--topk {rec['topk']}", "lower --topk"): replace(r, topk=1),
        (f"--samples {rec['samples']}", "lower --samples"): replace(r, samples=0),
        (f"--layers ({len(rec['layers'])} layers)", "record fewer --layers"): replace(r, recorded_layers=1),
        (f"--batch-tokens {rec['batch_tokens']}", "lower --batch-tokens"): replace(r, batch_tokens=r.seq_len),
        (f"--tokens {rec['part_tokens']:,}", "lower --tokens"): replace(r, tokens=0, total_tokens=0, distinct_grams=0),
    }
    saved = {key: base - need(sizes) for key, sizes in least.items()}
    shard = (f"--shard-tokens {rec['shard_tokens']:,}",
             "lower --shard-tokens, or give --host-memory (hidden states beyond it go to a file)")
    saved[shard] = memory.hidden_host_bytes
    what, fix = max(saved, key=saved.get)
    raise UserError(f"{what} makes this recording allocate about {human(total)} of host memory (d_ffn "
                    f"{meta['model']['d_ffn']:,}), but {human(have)} is available; {fix}, or free memory")


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


def default_shard_tokens(tokens: int, seq_len: int, batch_tokens: int) -> int:
    """Shards are the unit of checkpoints: a quarter of the recording (whole sequences), so a stopped
    recording keeps most of its work, and at most 262144 tokens, so a big one checkpoints often; but at least
    a batch: a smaller shard would run smaller batches, and pay what each shard costs besides its compute
    (its accumulators per layer, its segment) more often."""
    return max(seq_len, min(262144, max(batch_tokens, tokens // 4)) // seq_len * seq_len)


CALIB_SHARE = 0.05    # the default calibration sample: at most this share of the data's tokens ...
CALIB_TOKENS = 32768  # ... and at most this many


def default_calib_tokens(tokens_total: int, seq_len: int) -> int:
    """The calibration sample when --calib-tokens is not given: whole sequences, at most CALIB_TOKENS and at most
    CALIB_SHARE of the data (so it stays a small share of the recording's time); 0 where that is not one
    sequence: no early n-gram skips (a small recording's counts are small anyway), and a relative firing rule
    calibrates on one sequence."""
    return min(CALIB_TOKENS, int(tokens_total * CALIB_SHARE)) // seq_len * seq_len


# --part auto: where each launcher says which process this is
TORCHRUN_VARS = ("RANK", "WORLD_SIZE")
SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
PART_PLACEHOLDER = "{part}"


def _env_int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"{name}={env[name]!r} in the environment is not a whole number") from None


def auto_part(env) -> tuple[int, int]:
    """--part auto: part RANK+1 of WORLD_SIZE under torchrun, else part ID-MIN+1 of COUNT of a Slurm
    array (its task ids need not start at 0 or 1; a stepped array counts every STEP-th id)."""
    if any(name in env for name in TORCHRUN_VARS):
        missing = [name for name in TORCHRUN_VARS if name not in env]
        if missing:
            raise UserError(f"--part auto: torchrun's {' and '.join(missing)} is not set; start the parts with "
                            "torchrun or give --part i/n")
        i, n = _env_int(env, "RANK") + 1, _env_int(env, "WORLD_SIZE")
        source = f"RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']}"
    elif "SLURM_ARRAY_TASK_ID" in env:
        missing = [name for name in SLURM_VARS if name not in env]
        if missing:
            raise UserError(f"--part auto: Slurm's {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                            "not set; give --part i/n")
        task, low, n = (_env_int(env, name) for name in SLURM_VARS)
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        high = _env_int(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else None
        if step < 1 or (task - low) % step or (high is not None and (high - low) // step + 1 != n):
            raise UserError("--part auto: the Slurm array's task ids are not an evenly spaced range (like "
                            "--array=1-16); use such a range or give --part i/n")
        i = (task - low) // step + 1
        source = f"SLURM_ARRAY_TASK_ID={task} MIN={low} COUNT={n}"
    else:
        raise UserError("--part auto needs torchrun's RANK and WORLD_SIZE or a Slurm array's "
                        f"{', '.join(SLURM_VARS)}; set them or give --part i/n")
    if not 1 <= i <= n:
        raise UserError(f"--part auto: {source} gives part {i}/{n}, which is out of range")
    return i, n


def part_out(out: Path, part: tuple[int, int], auto: bool = False) -> Path:
    """--out with {part} replaced by the part number i (as in part-1.h5 ... part-8.h5, what merge reads);
    with --part auto every process of a split needs its own file, so a name without {part} is refused."""
    i, n = part
    if PART_PLACEHOLDER in str(out):
        return Path(str(out).replace(PART_PLACEHOLDER, str(i)))
    if auto and n > 1:
        raise UserError(f"--part auto makes {n} parts, each needs its own file: put {PART_PLACEHOLDER} in --out, "
                        f"like --out {out.with_name(f'{out.stem}.part{PART_PLACEHOLDER}{out.suffix}')}")
    return Path(out)


def auto_device(env, cuda_count: int) -> str:
    """--device auto: the GPU of this torchrun process (LOCAL_RANK), the first GPU without torchrun or
    when a launcher shows each process one GPU, else the CPU. A pure function, testable without a GPU."""
    if cuda_count <= 0:
        return "cpu"
    if "LOCAL_RANK" not in env or cuda_count == 1:
        return "cuda"
    local = _env_int(env, "LOCAL_RANK")
    if not 0 <= local < cuda_count:  # two processes on one GPU would each plan for all of its memory
        raise UserError(f"LOCAL_RANK {local} but this node shows {cuda_count} GPUs; start at most {cuda_count} "
                        "processes per node or give --device")
    return f"cuda:{local}"
