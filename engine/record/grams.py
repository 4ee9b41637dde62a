"""The n-grams of packed token sequences: the key of the n-gram ending at each token (what the recorder
counts (gram, neuron) pairs under) and the data's own n-gram counts, per shard."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ffnscope.cache.state import G_ORDERS, NGRAM_ORDERS, GramCounts


def gram_keys(tokens: np.ndarray, vocab: int, first_pos: int) -> tuple[dict, dict]:
    """Keys of the n-gram ending at each token, and whether it avoids the start token."""
    seq_len = tokens.shape[1]
    keys, valid = {}, {}
    positions = np.arange(seq_len)
    for n in NGRAM_ORDERS:
        key = tokens.astype(np.int64)
        for shift in range(1, n):  # first token most significant, as cache.schema.encode_grams
            prev = np.zeros_like(key)
            prev[:, shift:] = tokens[:, :-shift]
            key = key + prev * vocab ** shift
        keys[n] = key
        valid[n] = np.broadcast_to(positions - n + 1 >= first_pos, tokens.shape).copy()
    return keys, valid


def data_counts(tokens: np.ndarray, vocab: int, first_pos: int) -> tuple[np.ndarray, dict[int, GramCounts]]:
    keys, valid = gram_keys(tokens, vocab, first_pos)
    unigram = np.bincount(keys[1][valid[1]], minlength=vocab).astype(np.int64)
    grams = {}
    for n in (2, 3):
        gram, count = np.unique(keys[n][valid[n]], return_counts=True)
        grams[n] = GramCounts(gram, count.astype(np.int64))
    return unigram, grams


@dataclass
class GramTable:
    """One batch's distinct n-grams of every order, stacked (order 1's first, each order's sorted): the rows of
    the dense tables the CPU kernel counts a batch's (n-gram, neuron) pairs in (kernels.gram_pairs)."""
    grams: np.ndarray      # (rows,) int64 the n-gram keys; order k's are grams[bounds[k]:bounds[k + 1]]
    bounds: np.ndarray     # (orders + 1,) int64
    table_row: np.ndarray  # (orders, tokens) int64 each token's n-gram's row; -1: it holds the start token
    sum_of: np.ndarray     # (rows,) int64 a row's row among the orders that sum g (G_ORDERS); -1 elsewhere
    n_sum_rows: int

    @classmethod
    def of(cls, keys: dict[int, np.ndarray], valid: dict[int, np.ndarray]) -> "GramTable":
        """keys, valid: gram_keys' arrays for one batch (any shape; flattened row-major, as the tokens)."""
        grams, sum_of, bounds, n_sum = [], [], [0], 0
        n = keys[NGRAM_ORDERS[0]].size
        table_row = np.full((len(NGRAM_ORDERS), n), -1, np.int64)
        for k, order in enumerate(NGRAM_ORDERS):
            ok = valid[order].reshape(-1)
            distinct, index = np.unique(keys[order].reshape(-1)[ok], return_inverse=True)
            table_row[k, ok] = bounds[-1] + index
            sums = np.arange(n_sum, n_sum + len(distinct)) if order in G_ORDERS else np.full(len(distinct), -1)
            n_sum += len(distinct) if order in G_ORDERS else 0
            grams.append(distinct)
            sum_of.append(sums)
            bounds.append(bounds[-1] + len(distinct))
        return cls(np.concatenate(grams), np.asarray(bounds, np.int64), table_row,
                   np.concatenate(sum_of).astype(np.int64), n_sum)
