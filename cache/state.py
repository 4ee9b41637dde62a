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
        order = _pair_order(gram, neuron)
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


def _pair_order(gram: np.ndarray, neuron: np.ndarray) -> np.ndarray:
    """The stable order by (gram, neuron). One int64 key where it fits: numpy's stable sort of it (timsort) runs
    through the parts' sorted runs (a recorder's batches come as runs) about twice as fast as lexsort's two
    passes."""
    width = int(neuron.max()) + 1
    if int(gram.min()) >= 0 and int(gram.max()) < np.iinfo(np.int64).max // width:
        return np.argsort(gram * width + neuron, kind="stable")
    return np.lexsort((neuron, gram))


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
class PosIncrements:
    """pos_fire counted since a checkpoint's base, per layer: what a recording's checkpoints write instead of
    pos_fire whole (cache.store.write_state). A count is at most the sequences added since the base (one fire
    a sequence per position), so they are held, and written, in the narrowest unsigned type for that many:
    a quarter of pos_fire's int32 up to 255 sequences, half up to 65,535. `base`: the segment file holding
    pos_fire as it was at the base (cache.store.write_base); None: zeros, nothing was recorded before it."""
    base: str | None = None
    seqs: int = 0
    layers: dict[int, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def dtype(seqs: int) -> np.dtype:
        return np.min_scalar_type(seqs)

    def full_after(self, seqs: int) -> bool:
        """Whether `seqs` more sequences would make the increments as wide as pos_fire itself: a new base
        then costs what writing them would, and narrows them again."""
        return self.dtype(self.seqs + seqs).itemsize >= np.dtype(np.int32).itemsize

    def start(self, seqs: int) -> None:
        """Before `seqs` more sequences are added: the layers' increments widened to hold them."""
        self.seqs += seqs
        dtype = self.dtype(self.seqs)
        self.layers = {i: held.astype(dtype, copy=False) for i, held in self.layers.items()}

    def add(self, index: int, pos_fire: np.ndarray) -> None:
        held = self.layers.get(index)
        if held is None:
            held = self.layers[index] = np.zeros(pos_fire.shape, self.dtype(self.seqs))
        np.add(held, pos_fire, out=held, casting="unsafe")  # fits: start() widened it for these sequences

    def rebase(self, base: str) -> None:
        """pos_fire as it is now was written as `base`: nothing is counted since."""
        self.base, self.seqs, self.layers = base, 0, {}


class Growing:
    """An array that grows along `axis` by appending, each append costing what it appends: the buffer
    holds what `reserve` asked for, or doubles when full, so the rows already there are copied about once
    in all rather than once per append. `array` is a view of the rows held; the array it starts from is
    never written to."""

    def __init__(self, array: np.ndarray, axis: int = 0):
        self.axis, self._buffer, self._rows = axis, array, array.shape[axis]

    def _span(self, lo: int, hi: int) -> tuple:
        return (slice(None),) * self.axis + (slice(lo, hi),)

    @property
    def array(self) -> np.ndarray:
        return self._buffer[self._span(0, self._rows)]

    def reserve(self, rows: int) -> None:
        """Room for `rows` rows in all (a recording knows how many it will hold: no doubling then)."""
        if rows > self._buffer.shape[self.axis]:
            shape = list(self._buffer.shape)
            shape[self.axis] = rows
            buffer = np.empty(shape, self._buffer.dtype)
            buffer[self._span(0, self._rows)] = self.array
            self._buffer = buffer

    def append(self, rows: np.ndarray) -> None:
        self.tail(rows.shape[self.axis])[...] = rows
        self.commit(rows.shape[self.axis])

    def tail(self, n: int) -> np.ndarray:
        """A view of the `n` rows after the ones held, to be filled in place and then held by commit(n)."""
        end = self._rows + n
        if end > self._buffer.shape[self.axis]:
            self.reserve(max(end, 2 * self._buffer.shape[self.axis]))
        return self._buffer[self._span(self._rows, end)]

    def commit(self, n: int) -> None:
        self._rows += n


def merge_sorted_counts(a: GramCounts, b: GramCounts) -> GramCounts:
    """GramCounts.reduce([a, b]) for two sorted, unique GramCounts (a recording's so far and a shard's),
    without sorting: b's keys are found in a by binary search, its new ones inserted in one pass."""
    at = np.searchsorted(a.gram, b.gram)
    found = at < len(a.gram)
    found[found] = a.gram[at[found]] == b.gram[found]
    count = a.count.astype(np.int64)  # a copy: the caller's arrays stay as they were
    count[at[found]] += b.count[found]  # b's keys are unique: no index repeats
    new = ~found
    return GramCounts(np.insert(a.gram, at[new], b.gram[new]), np.insert(count, at[new], b.count[new]))


class DataState:
    """The recorded data: token streams in global sequence order, and the data's n-gram counts. A
    recording's shards come in data order and are appended (Growing): adding one costs its own size, not
    the recording's (a copy of everything per shard was ~10 TB over 1e9 tokens in 3,800 shards)."""

    def __init__(self, tokens: np.ndarray, seq_index: np.ndarray, domains: np.ndarray, unigram: np.ndarray,
                 grams: dict[int, GramCounts]):
        self._tokens = Growing(tokens)        # (n_seqs, seq_len) int32
        self._seq_index = Growing(seq_index)  # (n_seqs,) int64 global sequence numbers
        self._domains = Growing(domains)      # (n_seqs, seq_len) uint8 index into the recording's domain names
        self.unigram = unigram                # (vocab,) int64 token counts, start token excluded
        self.grams = grams                    # n = 2, 3: occurrence counts, start token excluded

    tokens = property(lambda self: self._tokens.array)
    seq_index = property(lambda self: self._seq_index.array)
    domains = property(lambda self: self._domains.array)

    @property
    def arrays(self) -> dict:
        """Everything held, by name (cache.store.nbytes)."""
        return dict(tokens=self.tokens, seq_index=self.seq_index, domains=self.domains, unigram=self.unigram,
                    grams=self.grams)

    def reserve(self, n_seqs: int) -> None:
        """Room for `n_seqs` sequences in all, so appending never moves what is held."""
        for rows in (self._tokens, self._seq_index, self._domains):
            rows.reserve(n_seqs)

    def add(self, other: "DataState") -> None:
        """Fold in disjoint data: appended when it comes after what is held, else sorted into place."""
        if self._follows(other):
            for rows, more in ((self._tokens, other.tokens), (self._seq_index, other.seq_index),
                               (self._domains, other.domains)):
                rows.append(more)
        else:
            order = np.argsort(np.concatenate([self.seq_index, other.seq_index]), kind="stable")
            self._tokens, self._seq_index, self._domains = (
                Growing(np.concatenate([mine, more])[order]) for mine, more in
                ((self.tokens, other.tokens), (self.seq_index, other.seq_index), (self.domains, other.domains)))
        self.unigram = self.unigram + other.unigram
        self.grams = {n: merge_sorted_counts(self.grams[n], other.grams[n]) for n in self.grams}

    def _follows(self, other: "DataState") -> bool:
        """Whether `other`'s sequences, in order, all come after these (appending keeps the order)."""
        index = other.seq_index
        ordered = bool(np.all(index[1:] >= index[:-1]))
        return ordered and (not len(self.seq_index) or not len(index) or index[0] > self.seq_index[-1])


class Samples:
    """Full activation vectors of every recorded layer at a fixed random sample of token positions.

    float32 (DTYPE): any finite g is kept, and exactly, whatever the model's dtype (float16,
    bfloat16 and float32 values all are float32 values), so NPL fits see the model's own numbers; float16
    turned g > 65504 into inf. bfloat16 would keep float16's size but round a float32 model's g to 8
    bits and need storing as uint16 bits (h5py has no bfloat16) for every reader to decode. The cost:
    2048 samples (the default) of SmolLM2's shape (30 layers x 1536) take 377 MB, not 189 MB.
    Older caches' float16 samples are cast on construction, so every reader computes in float32.
    A recording's shards come in data order and are appended (Growing), as DataState's streams."""
    DTYPE = np.float32

    def __init__(self, index: np.ndarray, acts: np.ndarray):
        self._index = Growing(np.asarray(index, np.int64))             # (n,) int64 global token index, ascending
        self._acts = Growing(np.asarray(acts, self.DTYPE), axis=1)     # (n_layers_recorded, n, d_ffn) float32

    index = property(lambda self: self._index.array)
    acts = property(lambda self: self._acts.array)

    @property
    def arrays(self) -> dict:
        """Everything held, by name (cache.store.nbytes)."""
        return dict(index=self.index, acts=self.acts)

    def reserve(self, n: int) -> None:
        """Room for `n` samples in all (a recording draws about samples x its share of the data's tokens)."""
        self._index.reserve(n)
        self._acts.reserve(n)

    def tail(self, index: np.ndarray) -> "Samples":
        """The samples at global token indices `index` (after every one held), their vectors to be filled in
        place (a recorder writes each layer's as it is done): a view of the room after the ones held, which
        commit(that view) then holds without copying it."""
        tail = Samples.__new__(Samples)
        tail._index = Growing(self._index.tail(len(index)))
        tail._index.array[:] = index
        tail._acts = Growing(self._acts.tail(len(index)), axis=1)
        return tail

    def commit(self, tail: "Samples") -> None:
        """Hold the samples of `tail` (from self.tail, filled)."""
        self._index.commit(len(tail.index))
        self._acts.commit(len(tail.index))

    def add(self, other: "Samples") -> None:
        if not len(self.index) or not len(other.index) or other.index[0] > self.index[-1]:
            # shards arrive in data order: appending keeps the order, without permuting every vector
            self._index.append(other.index)
            self._acts.append(other.acts)
            return
        order = np.argsort(np.concatenate([self.index, other.index]), kind="stable")
        self._index = Growing(np.concatenate([self.index, other.index])[order])
        self._acts = Growing(np.concatenate([self.acts, other.acts], axis=1)[:, order], axis=1)


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
