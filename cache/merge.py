"""Merge caches recorded as disjoint parts (`record --part i/n`) of one recording."""
from __future__ import annotations

from pathlib import Path

from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.state import RecordingState, ngram_drop_limit
from ffnscope.cache.store import read_state, write_state

# recording settings that change what is counted: caches differing in one of them never add up
_SAME_RECORDING = ("taus", "primary_tau", "layers", "ngram_layers", "ngram_max_freq", "calib_tokens",
                   "topk", "sample_rate", "n_seqs_total", "tau_rule")
# derived from the data and model during a run (calibration, n-gram bound): equal for the parts of one
# recording; a resumed run takes them from the cache it continues, so they are compared for merges only
_DERIVED = ("layer_taus", "ngram_bound")


def check_same_recording(old: dict, new: dict, path: Path, for_resume: bool) -> None:
    """Refuse to add up caches of different models, data or settings (one line naming the first)."""
    pairs = [("model", old["model"]["fingerprint"], new["model"]["fingerprint"]),
             ("model dtype", old["model"]["dtype"], new["model"]["dtype"]),
             ("data", old["data"]["fingerprint"], new["data"]["fingerprint"]),
             ("seq_len", old["data"]["seq_len"], new["data"]["seq_len"])]
    pairs += [(key, old["recording"].get(key), new["recording"].get(key)) for key in _SAME_RECORDING]
    if for_resume:
        pairs += [(key, old["recording"][key], new["recording"][key]) for key in ("part", "shard_tokens")]
    else:
        pairs += [(key, old["recording"].get(key), new["recording"].get(key)) for key in _DERIVED]
    for what, a, b in pairs:
        if a != b:
            fix = ("give the same options as the original run, or --force to start over" if for_resume
                   else "merge only parts of one recording")
            raise UserError(f"{path} was recorded with another {what} ({a} vs {b}); {fix}")


def merge(inputs: list[Path], out: Path, force: bool = False) -> RecordingState:
    if len(inputs) < 2:
        raise UserError("merge needs at least two part caches")
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; choose another --out or add --force")
    if any(Path(p).resolve() == out.resolve() for p in inputs):
        raise UserError(f"--out {out} is one of the inputs; write the merge to a new file")
    states = [read_state(p, "merging") for p in inputs]
    for path, state in zip(inputs, states):
        if state.status != schema.COMPLETE:
            raise UserError(f"{path} is partial; finish it with `ffnscope record ... --resume` before merging")
    first = states[0]
    seen: dict[int, Path] = {}
    for path, state in zip(inputs, states):
        check_same_recording(first.meta, state.meta, Path(path), for_resume=False)
        for part in state.meta["recording"].get("parts", [state.meta["recording"]["part"]]):
            if part[1] != first.meta["recording"]["part"][1]:
                raise UserError(f"{path} is part {part[0]}/{part[1]}, not of the same split into "
                                f"{first.meta['recording']['part'][1]} parts; merge parts of one split")
            if part[0] in seen:
                raise UserError(f"{path} overlaps {seen[part[0]]} (both hold part {part[0]}/{part[1]}); "
                                "merge each part once")
            seen[part[0]] = Path(path)
    merged = states[0]
    for state in states[1:]:
        merged.add(state)
    rec = merged.meta["recording"]
    for layer in merged.layers.values():  # as the recorder drops them after each shard: one recording's cache
        layer.drop_ngrams_over(ngram_drop_limit(rec), rec["primary_index"])
    n_parts = rec["part"][1]
    rec["parts"] = sorted([i, n_parts] for i in seen)
    rec["merged_from"] = [str(p) for p in inputs]
    rec["part_tokens"] = merged.n_tokens
    lo = min(s.meta["recording"]["seq_range"][0] for s in states)
    hi = max(s.meta["recording"]["seq_range"][1] for s in states)
    rec["seq_range"] = [lo, hi]
    if len(seen) == n_parts:
        rec["part"] = [1, 1]
    write_state(out, merged, schema.COMPLETE)
    return merged
