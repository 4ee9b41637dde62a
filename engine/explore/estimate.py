"""Rough job durations from a recording's measured speed, for the dialogs that start jobs.

The speed is the one a recording job last reported in the progress file beside its cache
(OUT.progress.json: tokens_per_s over the recorded layers, shards and statistics included); the cache
format keeps no timing. A later `analyze` job replaces that file, and the speed is then gone.
The estimate is tokens x work / speed, `work` counting forward passes over the recorded layers."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.jobs.progress import COMPLETE, read_progress

# forward passes over the recorded layers, per token, that an NPL job costs (rough: the fit's solves,
# the statistics and the model loading are left out)
FIT_WORK = 1.0  # one pass capturing every needed layer's activations
# Table 1: 4 chunks x 6 mappings (3 random seeds, zero, identical, NPL), each run from its chunk's first
# layer on (1 + 3/4 + 1/2 + 1/4 of the layers), plus the unmodified pass: 6 x 2.5 + 1
SUBSTITUTE_WORK = 16.0
FUNCTIONAL_WORK = 1.0  # one pass over the held-out tokens


@dataclass(frozen=True)
class Speed:
    tokens_per_s: float
    recording: str                  # the cache's file name it was measured on
    layers_run: int | None = None   # layers its forward passes ran (the last recorded layer + 1)
    model_layers: int | None = None  # layers of its model


def estimate_seconds(tokens: int, tokens_per_s: float, work: float = 1.0) -> float:
    """Seconds for `tokens` tokens costing `work` passes each, at `tokens_per_s` per pass."""
    if tokens_per_s <= 0:
        raise ValueError("tokens_per_s must be positive")
    return max(tokens, 0) * work / tokens_per_s


def human(seconds: float) -> str:
    """'under a minute', '12 min', '2 h 05 min'."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def describe(tokens: int | None, speed: Speed | None, work: float = 1.0, rough: bool = False,
             layers_run: int | None = None) -> str:
    """'about 12 min at 76 tok/s (measured on x.h5)'; `layers_run`: the new job's forward depth, the
    speed scaled from the measured one's (time grows with the layers run)."""
    if speed is None:
        return "no estimate yet: no measured recording speed"
    if tokens is None or tokens <= 0:
        return ""
    rate = speed.tokens_per_s
    if layers_run and speed.layers_run:
        rate *= speed.layers_run / layers_run
    text = (f"about {human(estimate_seconds(tokens, rate, work))} at {rate:,.0f} tok/s"
            f" (measured on {speed.recording})")
    return text + ", rough" if rough else text


def recording_speed(cache: Path) -> Speed | None:
    """The speed the recording job measured on `cache`: stored in its provenance, else (caches recorded
    before it was) its progress file's, if that is still the recording job's."""
    try:
        with CacheReader(Path(cache)) as reader:
            recording, status = reader.provenance.recording, reader.status
        speed = _stored_speed(cache, status, recording.tokens_per_s, len(recording.layers))
        if speed is not None:
            return speed
    except (UserError, OSError, KeyError, ValueError, TypeError):
        pass
    return _progress_speed(cache)


def _stored_speed(cache: Path, status: str, rate, layers: int | None) -> Speed | None:
    """The speed a complete recording keeps in its provenance (`rate`: as stored), or None."""
    if status == schema.COMPLETE and isinstance(rate, (int, float)) and rate > 0:
        return Speed(float(rate), Path(cache).name, layers)
    return None


def _progress_speed(cache: Path) -> Speed | None:
    """The speed in the progress file beside `cache`, if that is still the recording job's."""
    progress = read_progress(cache)
    if not isinstance(progress, dict) or progress.get("status") != COMPLETE:
        return None
    command = progress.get("command")
    if not isinstance(command, list) or "record" not in command:
        return None
    rate, layers = progress.get("tokens_per_s"), progress.get("n_layers")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        return None
    layers = layers if type(layers) is int and layers > 0 else None
    return Speed(float(rate), Path(cache).name, layers)


def model_of(command: list) -> str | None:
    """The --model value of a record job's argv."""
    try:
        return str(command[command.index("--model") + 1])
    except (ValueError, IndexError):
        return None


def same_model(spec: str, command_model: str | None, row_model: str | None) -> bool:
    """Does a recording (its job's --model, its catalog short name) use the model the form names?"""
    spec = spec.strip() or "default"
    if command_model is not None and (command_model == spec or command_model == str(Path(spec).expanduser().absolute())):
        return True
    short = spec.rstrip("/").rsplit("/", 1)[-1]
    short = short[:-5] if short.endswith(".gguf") else short
    return spec != "default" and row_model is not None and row_model.lower() == short.lower()


def latest_speed(rows: Iterable, spec: str) -> Speed | None:
    """The speed of the most recent complete recording (catalog rows) of the model `spec` names. Reads
    progress files only (small JSON: the record form asks at each keystroke): the speed a recording
    stores is in its catalog row, read when the catalog opened it."""
    best = None
    for row in rows:
        if getattr(row, "status", None) != schema.COMPLETE:
            continue
        progress = read_progress(row.path)
        command = progress.get("command") if isinstance(progress, dict) else None
        if not isinstance(command, list) or not same_model(spec, model_of(command), row.model):
            continue
        speed = (_stored_speed(row.path, row.status, row.tokens_per_s, row.n_layers)
                 or _progress_speed(row.path))
        if speed is not None and (best is None or (row.created or "") > (best[0] or "")):
            best = (row.created, replace(speed, model_layers=row.model_layers))
    return None if best is None else best[1]


def layers_run(layers: str, model_layers: int | None) -> int | None:
    """Layers a recording's forward passes run for a --layers text like '0-11,15' (empty: all)."""
    numbers = [int(n) for n in re.findall(r"\d+", layers or "")]
    return max(numbers) + 1 if numbers else model_layers
