"""What an NPL job reads: the recording's meta and model, packed data, the fit / held-out split and the
held-out text a substitution runs on (engine.npl.job uses them; no torch at import)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import check_fingerprint
from ffnscope.cache.npl_store import NplReader, sequence_hashes
from ffnscope.cache.reader import CacheReader

DEFAULT_FIT_TOKENS = 131072


def cache_meta(cache: Path, purpose: str) -> dict:
    with CacheReader(cache, purpose) as reader:
        if reader.status != "complete":  # its token stream and samples are a part of what was asked
            raise UserError(f"{cache} is a partial recording; finish it with `ffnscope record ... --resume` before "
                            f"{purpose}")
        return reader.meta


def recorded_sources(meta: dict) -> list[str]:
    """The data source specs of a recording, as `record` was given them."""
    specs = []
    for source in meta["data"]["sources"]:
        specs.append("builtin" if source["kind"] == "builtin" else source["path"])
    return specs


def load_model_of(meta: dict, options, cache: Path):
    """The recording's model (or options.model; options: a job.ModelOptions), refused unless it is the recorded one."""
    from ffnscope.engine.model.load import load_model

    lm = load_model(options.model or meta["model"]["spec"], options.dtype or meta["model"].get("dtype", "float32"),
                    options.trust_remote_code, options.allow_pickle)
    expected = meta["model"]["fingerprint"]
    check_fingerprint(expected, lm.fingerprint, f"the cache {cache}",
                      f"model {lm.name} (fingerprint {lm.fingerprint}) is not the model recorded in {cache} "
                      f"({meta['model']['name']}, fingerprint {expected}); give the recording's model with --model")
    return lm


def pack_text(lm, specs: list[str], field_name: str, seed: int, seq_len: int, n_seqs: int, log, report=None):
    """Packed sequences of the sources; report(fields) follows the tokenizing."""
    from ffnscope.engine.data.packing import pack, special_ids
    from ffnscope.engine.data.sources import open_sources

    sources = open_sources(specs, field=field_name, seed=seed)
    start_id, sep_id = special_ids(lm.tokenizer)
    started = time.time()

    def packing(have: int, need: int) -> None:
        rate = have / max(time.time() - started, 1e-9)
        report({"phase": "packing data", "tokens_done": have, "tokens_total": need, "tokens_per_s": rate,
                "eta_s": (need - have) / rate if rate > 0 else None})

    packed = pack(sources.documents(), lm.tokenizer, seq_len, n_seqs, start_id, sep_id,
                  packing if report is not None else None)
    for note in sources.notes:
        log(f"note: {note}")
    return packed, sources


def split_sequences(hashes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded random choice of held-out sequences (at least one, and at least one left to fit);
    sequences equal to a fit sequence (repeated text) are dropped from the held-out set."""
    n = len(hashes)
    if n < 2:
        raise UserError(f"the data gives {n} sequence(s); NPL needs at least 2 (fit and held-out): ask for more "
                        "--tokens or a shorter --seq-len")
    if not 0 < fraction < 1:
        raise UserError(f"--holdout {fraction} must lie strictly between 0 and 1")
    draw = np.random.default_rng([int(seed), 0x4E504C]).random(n)
    held = draw < fraction
    if not held.any():
        held[int(np.argmin(draw))] = True
    if held.all():
        held[int(np.argmax(draw))] = False
    held &= ~np.isin(hashes, hashes[~held])
    if not held.any():
        raise UserError("every held-out sequence repeats a fit sequence (the data repeats itself); give more "
                        "varied data")
    return held


def check_heldout(tokens: np.ndarray, fit_hashes: np.ndarray, where: str) -> None:
    """Refuse held-out text that shares sequences with the fit data."""
    shared = int(np.isin(sequence_hashes(tokens), fit_hashes).sum())
    if shared:
        raise UserError(f"the held-out data shares {shared} of its {len(tokens)} sequences with the data the NPL "
                        f"maps in {where} were fit on; give held-out text disjoint from the fit data (or leave "
                        "--data out to use the fit run's own held-out sequences)")


def heldout_for(config, reader: NplReader, lm, log, report=None) -> tuple[np.ndarray, str]:
    seq_len = int(reader.meta["fit"]["data"]["seq_len"])
    if config.data:
        limit = (config.tokens or DEFAULT_FIT_TOKENS // 8) // seq_len
        packed, _ = pack_text(lm, list(config.data), config.field, config.seed, seq_len, max(1, limit), log, report)
        tokens, source = packed.tokens, ",".join(map(str, config.data))
    else:
        tokens, source = reader.heldout_tokens(), "fit held-out split"
        if config.tokens:
            tokens = tokens[: max(1, config.tokens // seq_len)]
    check_heldout(tokens, reader.fit_hashes(), str(reader.path))
    return tokens, source
