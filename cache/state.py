"""The in-memory image of a recording: numpy arrays that add up.

Everything a recording holds is additive over disjoint data (counts and sums add, maxima and
top-k merge, token streams and samples concatenate), so the same `add` serves a shard finishing,
a resumed recording and the merge of part caches (which adds LayerStates one layer at a time and
copies token streams and samples itself: cache.merge). Top-k ties go to the smaller token index,
here and in the recorder's own per-batch merge (engine.record.stats), so any split adds up exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NGRAM_ORDERS = (1, 2, 3)
G_ORDERS = (1,)  # n-gram orders whose (gram, neuron) pairs also sum g over the fires (token detectors' updates)


@dataclass
class Sparse:
    """Counts keyed by (gram, neuron), sorted by gram then neuron, keys unique.
    `gram` encodes an n-gram of token ids in base vocab_size (see cache.schema.encode_grams).
    `g_sum`, for the orders in G_ORDERS (None for the others): the sum of g over those fires."""
    gram: np.ndarray
    neuron: np.ndarray
    count: np.ndarray
    g_sum: np.ndarray | None = None

    @classmethod
    def empty(cls, with_g: bool = False) -> "Sparse":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64),
                   np.zeros(0, np.float64) if with_g else None)

    @classmethod
    def reduce(cls, parts: list["Sparse"], with_g: bool = False) -> "Sparse":
        """Sum any number of (possibly overlapping, unsorted) parts into one sorted Sparse; with_g: sum
        their g_sum too (every part must carry it). Sums run in a fixed order (the parts' order, then
        each part's), so equal inputs give equal floats."""
        parts = [p for p in parts if len(p.gram)]
        if not parts:
            return cls.empty(with_g)
        gram = np.concatenate([p.gram for p in parts])
        neuron = np.concatenate([p.neuron for p in parts]).astype(np.int32, copy=False)
        count = np.concatenate([p.count for p in parts]).astype(np.int64, copy=False)
        order = np.lexsort((neuron, gram))
        gram, neuron, count = gram[order], neuron[order], count[order]
        starts = np.flatnonzero(np.r_[True, (gram[1:] != gram[:-1]) | (neuron[1:] != neuron[:-1])])
        g_sum = None
        if with_g:
            g = np.concatenate([p.g_sum for p in parts]).astype(np.float64, copy=False)[order]
            g_sum = np.bincount(np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(gram)])), weights=g,
                                minlength=len(starts))
        return cls(gram[starts], neuron[starts], np.add.reduceat(count, starts), g_sum)

    def drop_neurons(self, keep: np.ndarray) -> "Sparse":
        mask = keep[self.neuron]
        return Sparse(self.gram[mask], self.neuron[mask], self.count[mask],
                      None if self.g_sum is None else self.g_sum[mask])

    def __len__(self) -> int:
        return len(self.gram)


@dataclass
class GramCounts:
    """Occurrence counts of the data's n-grams, sorted by gram, keys unique."""
    gram: np.ndarray
    count: np.ndarray

    @classmethod
    def reduce(cls, parts: list["GramCounts"]) -> "GramCounts":
        gram = np.concatenate([p.gram for p in parts]) if parts else np.zeros(0, np.int64)
        count = np.concatenate([p.count for p in parts]) if parts else np.zeros(0, np.int64)
        keys, inverse = np.unique(gram, return_inverse=True)
        return cls(keys, np.bincount(inverse, weights=count, minlength=len(keys)).astype(np.int64))


def merge_topk(values: list[np.ndarray], indices: list[np.ndarray], gs: list[np.ndarray],
               k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column, the k largest values (ties: smaller token index first) with their token index and
    g; empty slots are -inf / -1 / NaN. engine.record.stats.LayerStats merges by the same rule."""
    value = np.concatenate(values, axis=0)
    index = np.concatenate(indices, axis=0)
    g = np.concatenate(gs, axis=0)
    order = np.lexsort((np.where(index < 0, np.iinfo(np.int64).max, index), -value), axis=0)[:k]
    return tuple(np.take_along_axis(a, order, 0) for a in (value, index, g))


@dataclass
class LayerState:
    fire_count: np.ndarray      # (n_taus[+1], d_ffn) int64: tokens where act > tau, per threshold; a relative
                                # rule adds a last row at the layer's own tau (meta recording.primary_index)
    g_sum: np.ndarray           # (d_ffn,) float64
    g_sumsq: np.ndarray         # (d_ffn,) float64
    g_max: np.ndarray           # (d_ffn,) float32
    pos_fire: np.ndarray        # (seq_len, d_ffn) int32: fires at primary tau, per position
    # contexts: ranked by act (what the firing rule thresholds: act(gate) for gated FFNs, g for
    # plain ones), at most one per sequence, positions >= 1; position 0 (the start token) has one slot
    topk_value: np.ndarray      # (k, d_ffn) float32 act, descending; -inf empty
    topk_index: np.ndarray      # (k, d_ffn) int64 global token index (seq_index * seq_len + pos), -1 empty
    topk_g: np.ndarray          # (k, d_ffn) float32 g at those tokens (signed); NaN empty
    start_value: np.ndarray     # (d_ffn,) float32 largest act at position 0 of any sequence
    start_index: np.ndarray     # (d_ffn,) int64 its global token index, -1 empty
    start_g: np.ndarray         # (d_ffn,) float32 g there
    ngram_counted: np.ndarray | None = None           # (d_ffn,) bool where n-gram counts are exact
    ngrams: dict[int, Sparse] = field(default_factory=dict)

    @classmethod
    def zeros(cls, n_taus: int, d_ffn: int, seq_len: int, k: int, ngram_counted=None) -> "LayerState":
        return cls(np.zeros((n_taus, d_ffn), np.int64), np.zeros(d_ffn), np.zeros(d_ffn),
                   np.full(d_ffn, -np.inf, np.float32), np.zeros((seq_len, d_ffn), np.int32),
                   np.full((k, d_ffn), -np.inf, np.float32), np.full((k, d_ffn), -1, np.int64),
                   np.full((k, d_ffn), np.nan, np.float32), np.full(d_ffn, -np.inf, np.float32),
                   np.full(d_ffn, -1, np.int64), np.full(d_ffn, np.nan, np.float32), ngram_counted,
                   {n: Sparse.empty(n in G_ORDERS) for n in NGRAM_ORDERS} if ngram_counted is not None else {})

    def add(self, other: "LayerState") -> None:
        self.fire_count += other.fire_count
        self.g_sum += other.g_sum
        self.g_sumsq += other.g_sumsq
        np.maximum(self.g_max, other.g_max, out=self.g_max)
        self.pos_fire += other.pos_fire
        k = self.topk_value.shape[0]
        self.topk_value, self.topk_index, self.topk_g = merge_topk(
            [self.topk_value, other.topk_value], [self.topk_index, other.topk_index], [self.topk_g, other.topk_g], k)
        start = merge_topk([self.start_value[None], other.start_value[None]], [self.start_index[None],
                           other.start_index[None]], [self.start_g[None], other.start_g[None]], 1)
        self.start_value, self.start_index, self.start_g = (a[0] for a in start)
        if self.ngram_counted is not None:
            # a neuron is counted in the sum only where every addend counted it
            keep = self.ngram_counted & other.ngram_counted
            self.ngram_counted = keep
            self.ngrams = {n: Sparse.reduce([self.ngrams[n].drop_neurons(keep),
                                             other.ngrams[n].drop_neurons(keep)], n in G_ORDERS)
                           for n in self.ngrams}

    def drop_ngrams_over(self, limit: int | None, primary: int) -> None:
        """Stop counting n-grams for the neurons whose fires so far already exceed `limit` over the
        whole recording (ngram_drop_limit): evidence that holds for the full data, every part of it and
        any merge of parts, since fire counts only grow."""
        if limit is None or self.ngram_counted is None:
            return
        over = self.fire_count[primary] > limit
        if (self.ngram_counted & over).any():
            keep = self.ngram_counted & ~over
            self.ngram_counted = keep
            self.ngrams = {n: sparse.drop_neurons(keep) for n, sparse in self.ngrams.items()}


def ngram_drop_limit(rec: dict) -> int | None:
    """Fires over the whole recording beyond which a neuron's n-gram counts are dropped (meta
    "recording" dict): "auto", what any detector can have (ngram_bound); --ngram-max-freq F, F x the
    recording's tokens (the user's cap replaces the bound; F >= 1 keeps every neuron's counts)."""
    bound, cap = rec.get("ngram_bound"), rec.get("ngram_max_freq")
    if bound is None:
        return None
    if cap == "auto":
        return bound["fires"]
    return None if cap >= 1 else int(cap * bound["tokens"])


@dataclass
class DataState:
    tokens: np.ndarray          # (n_seqs, seq_len) int32, in global sequence order
    seq_index: np.ndarray       # (n_seqs,) int64 global sequence numbers
    domains: np.ndarray         # (n_seqs, seq_len) uint8 index into the recording's domain names
    unigram: np.ndarray         # (vocab,) int64 token counts, start token excluded
    grams: dict[int, GramCounts]  # n = 2, 3: occurrence counts, start token excluded

    def add(self, other: "DataState") -> None:
        order = np.argsort(np.concatenate([self.seq_index, other.seq_index]), kind="stable")
        self.tokens = np.concatenate([self.tokens, other.tokens])[order]
        self.domains = np.concatenate([self.domains, other.domains])[order]
        self.seq_index = np.concatenate([self.seq_index, other.seq_index])[order]
        self.unigram = self.unigram + other.unigram
        self.grams = {n: GramCounts.reduce([self.grams[n], other.grams[n]]) for n in self.grams}


@dataclass
class Samples:
    """Full activation vectors of every recorded layer at a fixed random sample of token positions."""
    index: np.ndarray           # (n,) int64 global token index, ascending
    acts: np.ndarray            # (n_layers_recorded, n, d_ffn) float16

    def add(self, other: "Samples") -> None:
        if not len(self.index) or not len(other.index) or other.index[0] > self.index[-1]:
            # shards arrive in data order: appending keeps the order, without permuting every vector
            self.index = np.concatenate([self.index, other.index])
            self.acts = np.concatenate([self.acts, other.acts], axis=1)
            return
        order = np.argsort(np.concatenate([self.index, other.index]), kind="stable")
        self.index = np.concatenate([self.index, other.index])[order]
        self.acts = np.concatenate([self.acts, other.acts], axis=1)[:, order]


@dataclass
class RecordingState:
    meta: dict                  # provenance and settings, JSON-able (see cache.schema)
    layers: dict[int, LayerState]
    data: DataState
    samples: Samples
    shards_done: int = 0
    status: str = "partial"
    vocab: list[str] = field(default_factory=list)    # decoded string of each token id
    pieces: list[str] = field(default_factory=list)   # the tokenizer's own piece of each id ("Ġthe")

    @property
    def n_tokens(self) -> int:
        return int(self.data.tokens.size)

    def add(self, other: "RecordingState") -> None:
        """Fold in a recording of disjoint data with the same settings."""
        for index, layer in other.layers.items():
            self.layers[index].add(layer)
        self.data.add(other.data)
        self.samples.add(other.samples)
