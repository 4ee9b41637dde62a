"""What an NPL job reads: the recording's meta, model and sequences, the fit data and the held-out
sequences every evaluation runs on (engine.npl.job uses them; no torch at import).

Held-out sequences are never ones the recording or the fit used. By default they come from the fit
data's own sources, packed with the same seed and seq_len past every sequence the recording (when
the fit data is the recording's sources: all its parts) and the fit packed; `--heldout-data` gives
text from other files instead. Either way each held-out sequence is compared by fingerprint
(cache.npl_store.sequence_hashes) with every recorded and every fit sequence: by default equal ones
(repeated text) are dropped, given files that share one are refused."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import check_fingerprint
from ffnscope.cache.npl_store import NplReader, sequence_hashes
from ffnscope.cache.reader import CacheReader

DEFAULT_FIT_TOKENS = 131072
DEFAULT_HELDOUT_SEQS = 16  # held-out sequences behind every NPL figure, where the data allows
_HASH_ROWS = 4096          # recorded sequences read at a time


@dataclass
class Recording:
    """A complete recording's meta and the fingerprints of its sequences (every part's)."""
    meta: dict
    hashes: np.ndarray

    @property
    def n_seqs(self) -> int:
        return int(self.meta["data"]["n_seqs_total"])

    def same_stream(self, described: list[dict], field: str, seed: int) -> bool:
        """Whether sources (as Sources.describe() gives them: resolved paths) packed with this field and
        seed are the stream the recording packed."""
        data = self.meta["data"]
        where = [(d.get("kind"), d.get("path")) for d in described]
        return where == [(d.get("kind"), d.get("path")) for d in data["sources"]] and (field, seed) == (
            data["field"], data["seed"])

    def stream_seqs(self, seq_len: int) -> int:
        """Sequences of `seq_len` that cover the stream tokens the recording packed (a start token,
        if any, is not stream text)."""
        start = self.meta["tokenizer"].get("start_id") is not None
        used = self.n_seqs * (int(self.meta["data"]["seq_len"]) - start)
        return -(-used // (seq_len - start))


def recording(cache: Path, purpose: str) -> Recording:
    with CacheReader(cache, purpose) as reader:
        if reader.status != "complete":  # its token stream and samples are a part of what was asked
            raise UserError(f"{cache} is a partial recording; finish it with `ffnscope record ... --resume` before "
                            f"{purpose}")
        n = reader.n_tokens // int(reader.meta["data"]["seq_len"])
        hashes = np.concatenate([sequence_hashes(reader.tokens(slice(lo, min(lo + _HASH_ROWS, n))))
                                 for lo in range(0, n, _HASH_ROWS)] or [np.zeros(0, np.uint64)])
        return Recording(reader.meta, hashes)


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


def open_data(specs: list[str], field_name: str, seed: int):
    """The sources of `specs`, opened before the model loads: a bad file is refused at once."""
    from ffnscope.engine.data.sources import open_sources

    return open_sources([str(s) for s in specs], field=field_name, seed=seed)


def pack_text(lm, sources, seq_len: int, n_seqs: int, log, report=None):
    """Up to n_seqs packed sequences of opened sources; report(fields) follows the tokenizing."""
    from ffnscope.engine.data.packing import pack, special_ids

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
    return packed


def names(specs) -> str:
    return ",".join(map(str, specs))


def heldout_info(tokens: np.ndarray, source: str, dropped: int = 0) -> dict:
    """What the sidecar and every printed figure say about a held-out set (engine.npl.report.heldout_line)."""
    return {"seqs": int(len(tokens)), "tokens": int(tokens.size), "seq_len": int(tokens.shape[1]),
            "source": source, "dropped": int(dropped)}


@dataclass
class FitPlan:
    """Where a fit's sequences come from in the packed fit data."""
    n_fit: int      # the first n_fit sequences are fit on
    start: int      # held-out sequences are taken from here on
    n_pack: int     # sequences to pack
    recorded: int   # sequences of the packing the recording used (0: another stream)


def plan_fit_data(rec: Recording, described: list[dict], field: str, seed: int, seq_len: int, n_fit: int,
                  n_held: int, heldout_data: bool) -> FitPlan:
    """`described`: the fit data's Sources.describe()."""
    recorded = rec.stream_seqs(seq_len) if rec.same_stream(described, field, seed) else 0
    start = max(n_fit, recorded)
    # twice the held-out sequences: room for those dropped as repeats of recorded or fit text
    return FitPlan(n_fit, start, n_fit if heldout_data else start + 2 * n_held, recorded)


def split_fit_data(packed_tokens: np.ndarray, plan: FitPlan, rec: Recording, specs: list[str], n_held: int,
                   log) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """(fit tokens, held-out tokens or None, their heldout_info) of the packed fit data. Without
    --heldout-data the fit gives way (a note) where the data holds fewer sequences than the fit and
    the held-out set ask; what cannot hold n_held fresh sequences is refused, naming --heldout-data."""
    have, seq_len = len(packed_tokens), packed_tokens.shape[1]
    hashes = sequence_hashes(packed_tokens)
    if plan.recorded and seq_len == int(rec.meta["data"]["seq_len"]):
        n = min(rec.n_seqs, have)
        if not np.isin(hashes[:n], rec.hashes).all():
            log("note: the recording's sources no longer pack to its sequences (changed since it was recorded?); "
                "held-out sequences are still checked against every recorded one")
    if plan.n_pack == plan.n_fit:  # held-out text from other files (engine.npl.job notes a short fit)
        return packed_tokens[:plan.n_fit], None, None
    n_fit = min(plan.n_fit, max(have - n_held, plan.recorded))
    start = max(n_fit, plan.recorded)
    fit_tokens = packed_tokens[:n_fit]
    used = np.concatenate([rec.hashes, hashes[:n_fit]])
    rest = hashes[start:]
    first = np.zeros(len(rest), bool)
    first[np.unique(rest, return_index=True)[1]] = True  # repeats within the held-out set count once
    keep = np.flatnonzero(first & ~np.isin(rest, used))[:n_held]
    if n_fit < 1 or len(keep) < n_held:
        before = f"the recording's {plan.recorded} and the fit's {n_fit}" if plan.recorded else f"the fit's {n_fit}"
        raise UserError(f"{names(specs)} holds {have} sequences of {seq_len} tokens: after {before}, "
                        f"{len(keep)} fresh ones are left for held-out evaluation, fewer than the {n_held} asked; "
                        "give held-out text from other files with --heldout-data FILE... (or fewer with "
                        "--heldout-seqs)")
    if n_fit < plan.n_fit:
        log(f"note: the fit data holds {have} sequences of {seq_len}; fitting on {n_fit} (--tokens asks "
            f"{plan.n_fit}) so that {n_held} fresh ones are held out")
    dropped = int(keep[-1]) + 1 - len(keep)
    whose = f"the recording's {plan.recorded}, the fit's {n_fit}" if plan.recorded else f"the fit's {n_fit}"
    source = f"{names(specs)} past the first {start:,} sequences of its packing ({whose})"
    held = packed_tokens[start:][keep]
    return fit_tokens, held, heldout_info(held, source, dropped)


def given_heldout(packed_tokens: np.ndarray, specs, used: np.ndarray, n_held: int,
                  smaller: str) -> tuple[np.ndarray, dict]:
    """Held-out text from --heldout-data: refused when it shares a sequence with the recording or the fit
    (`used`: their fingerprints), or holds fewer than n_held sequences (`smaller`: the option that asks fewer)."""
    shared = int(np.isin(sequence_hashes(packed_tokens), used).sum())
    if shared:
        raise UserError(f"--heldout-data {names(specs)} shares {shared} of its {len(packed_tokens)} sequences with "
                        "the recording's or the fit's data; give held-out text from files neither used")
    if len(packed_tokens) < n_held:
        raise UserError(f"--heldout-data {names(specs)} holds {len(packed_tokens)} sequences of "
                        f"{packed_tokens.shape[1]} tokens, fewer than the {n_held} asked; give more text or ask "
                        f"for fewer with {smaller}")
    return packed_tokens, heldout_info(packed_tokens, f"{names(specs)} (--heldout-data)")


def stored_heldout(reader: NplReader, rec: Recording, cache: Path, tokens: int | None,
                   hint: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The fit's held-out sequences and losses (at most `tokens` tokens, whole sequences) with their
    heldout_info; refused when any is a recorded sequence (a sidecar an older ffnscope fit)."""
    held, nll = reader.heldout_tokens(), reader.heldout_nll()
    recorded = int(np.isin(sequence_hashes(held), rec.hashes).sum())
    if recorded:
        raise UserError(f"{reader.path}: {recorded} of its {len(held)} held-out sequences are ones the recording "
                        f"used (fit by an older ffnscope); fit the maps again with `ffnscope npl fit {cache} "
                        f"--force`{hint}")
    if tokens:
        keep = max(1, tokens // held.shape[1])
        held, nll = held[:keep], nll[:keep]
    fit = reader.meta.get("fit", {})
    source = fit.get("heldout", {}).get("source") or "the fit's held-out split"
    return held, nll, heldout_info(held, source, 0)


def heldout_for(config, reader: NplReader, rec: Recording, lm, sources, log, report=None) -> tuple[np.ndarray, dict]:
    """A substitution's held-out sequences from --heldout-data (`sources`, opened): 16 sequences, or
    --tokens' whole sequences."""
    seq_len = int(reader.meta["fit"]["data"]["seq_len"])
    n_held = config.tokens // seq_len if config.tokens else DEFAULT_HELDOUT_SEQS
    if n_held < 1:
        raise UserError(f"--tokens {config.tokens} is less than one sequence of {seq_len}; ask for more")
    packed = pack_text(lm, sources, seq_len, n_held, log, report)
    used = np.concatenate([rec.hashes, reader.fit_hashes()])
    return given_heldout(packed.tokens, config.heldout_data, used, n_held, "--tokens")
