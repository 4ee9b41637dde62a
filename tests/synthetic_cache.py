"""A synthetic recording cache shaped like OPT-66b's, with all four analyses stored: for tests, and for
benchmarking the TUI on 64 x 36,864 = 2.36M neurons (bench/tui_open.py).

    python -m tests.synthetic_cache OUT.h5 [--layers 64] [--d-ffn 36864] [--seq-len 2048] [--vocab 50272]
                                           [--seqs 64] [--samples 0] [--seed 0]

or from Python: `from tests.synthetic_cache import generate; planted = generate(path, layers=4, d_ffn=256)`.
Prints the generation time, file size and peak memory.

It writes only through the cache's own writers: the recording as a cache.state.RecordingState through
cache.store.write_state (its meta from engine.record.meta.build_meta), the analyses through
cache.analysis_store.write_results. So its structure is a real cache's by construction.

What is exact:
- Analyses: `dead` and `ngrams` are computed by the real analysis job (engine.analysis.job.Analyzer)
  on the written file; `positional` is what it computes too (positional_layer on the columns that
  hold a fire; the others are all zeros). Their params/recording/inputs are those `analyze` writes
  with default settings, so `analyze` reports all four as current.
- Data: `data/unigram` and `data/gram2,3` are counted from `data/tokens` as the recorder counts them;
  n-gram detectors fire on every occurrence of their triggers in the token stream (plus < 5 % of
  noise fires), their fire counts, `pos_fire` columns and n-gram counts follow from those positions.

What is synthetic, and where it is not what a real recording would hold:
- `suppression` rows (one per token detector the ngrams analysis found) are drawn, not projected
  through model weights: there is no model. Recomputing suppression fails (the model spec
  `synthetic:opt-66b` cannot be loaded); `--only dead ngrams positional` works.
- `pos_fire` is zero except for planted positional neurons and n-gram detectors, so for the other
  alive neurons fire_count[primary] is not the sum of their pos_fire column and their pos_mi is 0.
- The n-gram counts of counted neurons that are not detectors are a random sample of 2-40 of their
  fires: their `fires` in analysis/ngrams is below fire_count and their coverage numbers are small.
- Fire counts at the other thresholds, g moments, g_max and top-k: see tests/fixtures/synthetic_layers.py.
- suppression's `trigger_g` is drawn positive (ReLU); `suppresses_z` is `trigger_logit_z < 0` and
  `suppresses_logit` is `trigger_logit < 0`, trigger_logit following the z-score shifted down a little.
- No activation samples by default (`--samples N` keeps N): a default recording keeps 2048, which at
  this size is 19.3 GB of float32.
Layers are made one at a time as write_state asks for them (MadeInTurn), so memory holds one layer
(pos_fire alone is 300 MB at the default size), never the whole recording (19 GB).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ffnscope.cache import analysis_store as store
from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.cache.state import DataState, LayerState, RecordingState, Samples
from ffnscope.cache.store import nbytes, write_state
from ffnscope.engine.analysis.job import (POSITIONAL_COLUMNS, SUPPRESSION_KEYS, Analyzer, put_positional,
                                          put_suppression_rows)
from ffnscope.engine.analysis.positional import KINDS, PositionalParams, call_limit
from tests.fixtures.synthetic_data import HOSTILE, SPECIALS, TOPK, Data, make_meta, vocabulary
from tests.fixtures.synthetic_layers import LayerMaker, positional_columns

class MadeInTurn(Mapping):
    """Layers made when write_state reads them, in order; each is dropped once written. `most_alive` is
    the most layers that were in memory at once: 2, the one written and the next being made."""

    def __init__(self, n: int, make):
        self.n, self.make, self.alive, self.most_alive = n, make, [], 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.n))

    def __getitem__(self, layer: int):
        made = self.make(layer)
        self.alive = [ref for ref in self.alive if ref() is not None] + [weakref.ref(made)]
        self.most_alive = max(self.most_alive, len(self.alive))
        return made


def generate(path, layers: int = 64, d_ffn: int = 36864, seq_len: int = 2048, vocab: int = 50272,
             seed: int = 0, n_seqs: int = 64, samples: int = 0, log=None) -> dict:
    """Write a synthetic cache to `path`; -> what was planted (per-layer lists) and where it went."""
    log = log or (lambda _m: None)
    if seq_len < 64 or n_seqs < TOPK or vocab < 300 or d_ffn < 64 or layers < 1:
        raise ValueError("need seq_len >= 64, n_seqs >= 16, vocab >= 300, d_ffn >= 64 and layers >= 1")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    path = Path(path)
    data = Data(rng, vocab, seq_len, n_seqs)
    eligible = data.eligible(data.tokens.size)
    words, pieces = vocabulary(rng, vocab, data.tok_size, data.rank_to_id, data.hostile_ids)
    meta = make_meta(layers, d_ffn, vocab, data, samples, seed)
    ngram_layers = meta["recording"]["ngram_layers"]
    primary = meta["recording"]["primary_index"]
    planted = {"path": str(path), "layers": layers, "d_ffn": d_ffn, "seq_len": seq_len, "n_seqs": n_seqs,
               "vocab": vocab, "n_tokens": data.tokens.size, "dead": [], "token_detectors": [],
               "bigram_detectors": [], "trigram_detectors": [], "positional": {k: [] for k in KINDS},
               "positional_strong": [], "mismatches": []}
    positional = Positional(data)
    plans = {}
    maker = LayerMaker(rng, meta, data, eligible)

    def make(layer: int) -> LayerState:
        made, plans[layer], columns = maker.make(layer, layer in ngram_layers)
        found = positional.add(layer, made.pos_fire, columns)
        planted["dead"].append(int((made.fire_count[primary] == 0).sum()))
        _compare_positional(planted, layer, plans[layer], found)
        if layer % 8 == 7 or layer == layers - 1:
            log(f"  layer {layer + 1}/{layers}  {time.perf_counter() - started:.0f} s")
        return made

    made = MadeInTurn(layers, make)
    state = RecordingState(meta, made, DataState(data.tokens, np.arange(n_seqs, dtype=np.int64), data.domains,
                                                 data.unigram, data.grams),
                           _samples(np.random.default_rng([seed, 1]), meta, maker, samples),
                           meta["recording"]["n_shards"], schema.COMPLETE, words, pieces)
    one = LayerState.zeros(len(meta["recording"]["taus"]), d_ffn, seq_len, TOPK)
    needs = nbytes(state.data) + nbytes(state.samples) + layers * nbytes(one)  # n-gram pairs: a few % more
    del one
    write_state(path, state, schema.COMPLETE, needs=needs)
    planted["most_layers_in_memory"] = made.most_alive
    del state, made
    log(f"  recording written  {time.perf_counter() - started:.0f} s")
    with CacheReader(path) as reader:
        analyzer = Analyzer(reader, {}, log=lambda _m: None)
        analyzer.run(["dead", "ngrams"])
        results = [analyzer.fresh["dead"], analyzer.fresh["ngrams"], positional.result(analyzer),
                   _suppression(rng, analyzer, data, layers)]
        recording = store.recording_key(reader)
    store.write_results(path, results, recording)
    _compare_detectors(planted, plans, ngram_layers, analyzer.fresh["ngrams"].arrays)
    supp = results[-1].arrays
    planted.update(
        ranges=len(positional.ranges), suppression_rows=len(supp["neuron"]),
        suppresses_logit=int(supp["suppresses_logit"].sum()), suppresses_z=int(supp["suppresses_z"].sum()),
        hostile_tokens={int(t): s for t, s in zip(data.hostile_ids.tolist(), HOSTILE)},
        hostile_triggers={k: v for k, v in zip(("token", "bigram", "trigram"), maker.hostile_triggers.values())},
        seconds=time.perf_counter() - started, bytes=path.stat().st_size)
    return planted


class Positional:
    """engine.analysis.job.Analyzer's positional analysis, run layer by layer on the columns of pos_fire
    that hold a fire (the analysis of an all-zero column is all zeros)."""

    def __init__(self, data: Data):
        self.data, self.params = data, PositionalParams()
        self.columns: dict[str, list[np.ndarray]] = {key: [] for key in POSITIONAL_COLUMNS}
        self.layers: list[int] = []
        self.ranges: list[tuple] = []

    def add(self, layer: int, pos_fire: np.ndarray, cols: np.ndarray) -> dict:
        """-> {"positional": count per kind, "positional_strong": count} found in this layer."""
        d = pos_fire.shape[1]
        self.layers.append(layer)
        mi = {key: np.zeros(d) for key in ("mi", "mi_plugin", "mi_chance", "mi_null")}
        positional, strong, kind = np.zeros(d, bool), np.zeros(d, bool), np.zeros(d, np.uint8)
        analysed = positional_columns(pos_fire, cols, self.data.n_seqs, self.params)
        for column in sorted(analysed):  # ranges in neuron order, as the analysis lists them
            value, k, s, spans = analysed[column]
            for key in mi:
                mi[key][column] = value[key]
            if k:
                positional[column], kind[column], strong[column] = True, KINDS.index(k) + 1, s
            self.ranges += [(layer, column, a, b) for a, b in spans]
        for key, value in ({**mi, "positional": positional, "kind": kind, "strong": strong}).items():
            self.columns[key].append(value)
        return {"positional": {k: int((kind[positional] == i + 1).sum()) for i, k in enumerate(KINDS)},
                "positional_strong": int((strong & positional).sum())}

    def result(self, analyzer: Analyzer) -> store.Result:
        result = store.Result("positional", analyzer.params_of("positional"))
        put_positional(result, self.layers, self.columns, self.ranges,
                       call_limit(self.data.n_seqs, self.data.seq_len, self.params))
        return result


def _suppression(rng, analyzer: Analyzer, data: Data, n_layers: int) -> store.Result:
    """The suppression analysis' rows for the token detectors the ngrams analysis found, drawn instead of
    projected through model weights, stored as Analyzer stores them."""
    ngrams = analyzer.fresh["ngrams"].arrays
    top = analyzer.params["suppression"].top
    parts: dict[str, list] = {key: [] for key in SUPPRESSION_KEYS + ("layer",)}
    for row, layer in enumerate(ngrams["layers"].tolist()):
        neurons = np.flatnonzero(ngrams["n1/detector"][row])
        mine = ngrams["n1/covered_layer"] == layer
        triggers = [ngrams["n1/covered_gram"][mine & (ngrams["n1/covered_neuron"] == i)] for i in neurons]
        rows = _suppression_rows(rng, layer, layer / max(n_layers - 1, 1), neurons, triggers, data.tok_size,
                                 data.hostile_ids, top)
        for key in parts:
            parts[key].append(rows[key])
    result = store.Result("suppression", analyzer.params_of("suppression"), analyzer.inputs("suppression"))
    put_suppression_rows(result, parts, top)
    return result


def _suppression_rows(rng, layer: int, x: float, detectors: np.ndarray, triggers: list[np.ndarray],
                      tok_size: int, hostile: np.ndarray, top: int) -> dict:
    """What suppression_layer returns for these token detectors, drawn instead of projected: deeper
    detectors more often suppress their own triggers (paper Sec. 4.4)."""
    m = len(detectors)
    picks = np.zeros((m, 3 * top), np.int64)
    todo = np.arange(m)
    while len(todo):  # 3 * top distinct tokens per row
        picks[todo] = rng.integers(len(SPECIALS), tok_size, (len(todo), 3 * top))
        ordered = np.sort(picks[todo], 1)
        todo = todo[(ordered[:, 1:] == ordered[:, :-1]).any(1)]
    promoted, suppressed, spare = picks[:, :top], picks[:, top:2 * top], picks[:, 2 * top:]
    suppresses = rng.random(m) < 0.35 + min(x, 0.5)
    for i in range(m):  # rows are few (one per token detector)
        t = np.unique(triggers[i])[:top]
        others = spare[i][~np.isin(spare[i], t)]
        if suppresses[i]:  # the triggers lead the suppressed list
            rest = suppressed[i][~np.isin(suppressed[i], t)]
            suppressed[i] = np.concatenate([t, rest, others])[:top]
        promoted[i] = np.concatenate([promoted[i][~np.isin(promoted[i], t)], others])[:top]
    if m and layer == 0 and len(hostile):  # hostile strings among the promoted tokens too
        h = hostile[:top]
        promoted[0] = np.concatenate([h, promoted[0][~np.isin(promoted[0], h)]])[:top]
    promoted_score = np.sort(rng.gamma(2.0, 0.6, (m, top)).astype(np.float32), 1)[:, ::-1]
    suppressed_score = -np.sort(rng.gamma(2.0, 0.6, (m, top)).astype(np.float32), 1)[:, ::-1]
    score = np.where(suppresses, -rng.uniform(1.5, 6.0, m), rng.uniform(0.2, 3.0, m)).astype(np.float32)
    g_at = rng.uniform(0.5, 3.0, m).astype(np.float32)  # ReLU: g is positive at every firing
    rank = np.where(suppresses, rng.uniform(0.0, 0.05, m), rng.uniform(0.3, 1.0, m)).astype(np.float32)
    # the raw reading: the vocabulary's contributions (std 0.05) lowered a little as a whole (mean -0.02), so a
    # detector with a small positive z has a negative raw logit, as in real models (the readings disagree)
    raw = (0.05 * score - 0.02).astype(np.float32)
    return {"neuron": detectors.astype(np.int32), "promoted": promoted, "promoted_score": promoted_score,
            "suppressed": suppressed, "suppressed_score": suppressed_score, "trigger_g": g_at,
            "trigger_logit": raw, "trigger_logit_z": score, "trigger_rank": rank, "suppresses_logit": raw < 0,
            "suppresses_z": score < 0,
            "layer": np.full(m, layer, np.int64)}


def _compare_positional(planted: dict, layer: int, plan: dict, found: dict) -> None:
    """Note the positional neurons planted in a layer, and any difference from what the analysis found."""
    for kind in KINDS:
        planted["positional"][kind].append(plan["positional"][kind])
    planted["positional_strong"].append(plan["positional_strong"])
    if found["positional"] != plan["positional"] or found["positional_strong"] != plan["positional_strong"]:
        planted["mismatches"].append(f"layer {layer}: positional planted {plan['positional']}, "
                                     f"found {found['positional']}")


def _compare_detectors(planted: dict, plans: dict, ngram_layers: list[int], ngrams: dict) -> None:
    """Note the detectors planted per layer, and any difference from what the ngrams analysis found."""
    for layer, plan in plans.items():
        for n, name in ((1, "token_detectors"), (2, "bigram_detectors"), (3, "trigram_detectors")):
            chosen = np.sort(np.asarray(plan["detectors"][n], np.int64))
            planted[name].append(len(chosen))
            if layer in ngram_layers:
                found = np.flatnonzero(ngrams[f"n{n}/detector"][ngram_layers.index(layer)])
                if not np.array_equal(chosen, found):
                    planted["mismatches"].append(f"layer {layer}: {name} planted {len(chosen)}, found {len(found)}")


def _samples(rng, meta: dict, maker: LayerMaker, samples: int) -> Samples:
    """Activation samples at random positions past the start token, drawn per neuron at its
    layer-average frequency."""
    n_layers, d, N, T = len(meta["recording"]["layers"]), maker.d, maker.N, maker.T
    candidates = np.flatnonzero(np.arange(N) % T != 0)
    index = np.sort(rng.choice(candidates, min(samples, len(candidates)), replace=False)).astype(np.int64)
    acts = np.zeros((n_layers, len(index), d), np.float32)
    for layer in range(n_layers if len(index) else 0):
        freq = 10 ** rng.uniform(-4, -0.6, d)
        fires = rng.random((len(index), d)) < freq
        acts[layer] = np.where(fires, rng.exponential(0.6, (len(index), d)), 0.0)
    return Samples(index, acts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--d-ffn", type=int, default=36864)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--seqs", type=int, default=64, help="sequences of --seq-len tokens (default 64)")
    parser.add_argument("--samples", type=int, default=0, help="activation samples to store (default none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"writing {args.out}: {args.layers} layers x {args.d_ffn:,} neurons, {args.seqs} x {args.seq_len} tokens, "
          f"vocabulary {args.vocab:,}", flush=True)
    try:
        planted = generate(args.out, layers=args.layers, d_ffn=args.d_ffn, seq_len=args.seq_len, vocab=args.vocab,
                           seed=args.seed, n_seqs=args.seqs, samples=args.samples,
                           log=lambda message: print(message, flush=True))
    except (ValueError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    L = args.layers
    print(f"generated in {planted['seconds']:.1f} s; file {planted['bytes'] / 2**30:.2f} GiB "
          f"({planted['bytes']:,} bytes); peak RSS {peak / 2**30:.2f} GiB")
    print(f"planted: {sum(planted['dead']):,} dead of {L * args.d_ffn:,} neurons; detectors "
          f"{sum(planted['token_detectors']):,} token, {sum(planted['bigram_detectors']):,} bigram, "
          f"{sum(planted['trigram_detectors']):,} trigram; positional "
          + ", ".join(f"{sum(v):,} {k}" for k, v in planted["positional"].items())
          + f" ({sum(planted['positional_strong']):,} strong, {planted['ranges']:,} ranges); "
          f"{planted['suppression_rows']:,} suppression rows")
    for problem in planted["mismatches"]:
        print(f"warning: {problem}")
    return 1 if planted["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
