"""The n-grams of packed token sequences: the key of the n-gram ending at each token (what the recorder
counts (gram, neuron) pairs under) and the data's own n-gram counts, per shard."""
from __future__ import annotations

import numpy as np

from ffnscope.cache.state import NGRAM_ORDERS, GramCounts


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
