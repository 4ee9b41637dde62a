"""The in-memory image of a recording: numpy arrays that add up.

Everything a recording holds is additive over disjoint data (counts and sums add, maxima and
top-k merge, token streams and samples concatenate), so the same `add` serves a shard finishing,
a resumed recording and the merge of part caches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NGRAM_ORDERS = (1, 2, 3)


@dataclass
class Sparse:
    """Counts keyed by (gram, neuron), sorted by gram then neuron, keys unique.
    `gram` encodes an n-gram of token ids in base vocab_size (see cache.schema.encode_grams)."""
    gram: np.ndarray
    neuron: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls) -> "Sparse":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))

    @classmethod
    def reduce(cls, parts: list["Sparse"]) -> "Sparse":
        """Sum any number of (possibly overlapping, unsorted) parts into one sorted Sparse."""
        parts = [p for p in parts if len(p.gram)]
        if not parts:
            return cls.empty()
        gram = np.concatenate([p.gram for p in parts])
        neuron = np.concatenate([p.neuron for p in parts]).astype(np.int32, copy=False)
        count = np.concatenate([p.count for p in parts]).astype(np.int64, copy=False)
        order = np.lexsort((neuron, gram))
        gram, neuron, count = gram[order], neuron[order], count[order]
        starts = np.flatnonzero(np.r_[True, (gram[1:] != gram[:-1]) | (neuron[1:] != neuron[:-1])])
        return cls(gram[starts], neuron[starts], np.add.reduceat(count, starts))

    def drop_neurons(self, keep: np.ndarray) -> "Sparse":
        mask = keep[self.neuron]
        return Sparse(self.gram[mask], self.neuron[mask], self.count[mask])

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


def merge_topk(values: list[np.ndarray], indices: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the k largest values (ties: smaller token index first); empty slots are -inf / -1."""
    value = np.concatenate(values, axis=0)
    index = np.concatenate(indices, axis=0)
    order = np.lexsort((np.where(index < 0, np.iinfo(np.int64).max, index), -value), axis=0)[:k]
    return np.take_along_axis(value, order, 0), np.take_along_axis(index, order, 0)


@dataclass
class LayerState:
    fire_count: np.ndarray      # (n_taus, d_ffn) int64: tokens where act > tau, per threshold
    g_sum: np.ndarray           # (d_ffn,) float64
    g_sumsq: np.ndarray         # (d_ffn,) float64
    g_max: np.ndarray           # (d_ffn,) float32
    pos_fire: np.ndarray        # (seq_len, d_ffn) int32: fires at primary tau, per position
    topk_value: np.ndarray      # (k, d_ffn) float32, descending
    topk_index: np.ndarray      # (k, d_ffn) int64 global token index (seq_index * seq_len + pos), -1 empty
    ngram_counted: np.ndarray | None = None           # (d_ffn,) bool where n-gram counts are exact
    ngrams: dict[int, Sparse] = field(default_factory=dict)

    @classmethod
    def zeros(cls, n_taus: int, d_ffn: int, seq_len: int, k: int, ngram_counted=None) -> "LayerState":
        return cls(np.zeros((n_taus, d_ffn), np.int64), np.zeros(d_ffn), np.zeros(d_ffn),
                   np.full(d_ffn, -np.inf, np.float32), np.zeros((seq_len, d_ffn), np.int32),
                   np.full((k, d_ffn), -np.inf, np.float32), np.full((k, d_ffn), -1, np.int64),
                   ngram_counted,
                   {n: Sparse.empty() for n in NGRAM_ORDERS} if ngram_counted is not None else {})

    def add(self, other: "LayerState") -> None:
        self.fire_count += other.fire_count
        self.g_sum += other.g_sum
        self.g_sumsq += other.g_sumsq
        np.maximum(self.g_max, other.g_max, out=self.g_max)
        self.pos_fire += other.pos_fire
        k = self.topk_value.shape[0]
        self.topk_value, self.topk_index = merge_topk(
            [self.topk_value, other.topk_value], [self.topk_index, other.topk_index], k)
        if self.ngram_counted is not None:
            # a neuron is counted in the sum only where every addend counted it
            keep = self.ngram_counted & other.ngram_counted
            self.ngram_counted = keep
            self.ngrams = {n: Sparse.reduce([self.ngrams[n].drop_neurons(keep),
                                             other.ngrams[n].drop_neurons(keep)])
                           for n in self.ngrams}


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
