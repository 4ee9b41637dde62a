"""Per-neuron n-gram lists of the neuron index: trigger n-grams, promoted and suppressed tokens. Few
neurons have them, so they stay sorted arrays of encoded n-grams (cache.schema) and become text only
for the rows shown, exported or searched."""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from ffnscope.cache.schema import decode_grams


class Grams:
    """Per-neuron n-grams (triggers, promoted or suppressed tokens) as sorted numpy arrays; their
    text is made only for the rows asked for (a 66b cache has tens of thousands of them)."""

    def __init__(self, rows: np.ndarray, grams: np.ndarray, n: int, vocab: list[str], vocab_size: int,
                 values: np.ndarray | Callable[[], np.ndarray] | None = None):
        """`values`: one per n-gram, in the order given, or a function that gives them on first use."""
        self._order = np.argsort(rows, kind="stable")
        self.rows, self.grams = rows[self._order], grams[self._order]
        self._values = values if values is None or callable(values) else values[self._order]
        self.n, self.vocab, self.vocab_size = n, vocab, vocab_size
        self._vocab: np.ndarray | None = None  # the vocabulary as an object array, made on first use
        self._texts: np.ndarray | None = None
        self._folded: list[str] | None = None
        self._lock = threading.RLock()  # texts() makes the vocabulary array under it too

    @property
    def values(self) -> np.ndarray | None:
        if callable(self._values):
            with self._lock:
                if callable(self._values):
                    self._values = self._values()[self._order]
        return self._values

    def _span(self, row: int) -> slice:
        return slice(*np.searchsorted(self.rows, [row, row + 1]))

    def __contains__(self, row: int) -> bool:
        span = self._span(row)
        return span.stop > span.start

    def text(self, grams: np.ndarray) -> list[str]:
        return self._text_array(grams).tolist()

    def _text_array(self, grams: np.ndarray) -> np.ndarray:
        """The n-grams' texts as an object array: their tokens' strings added column by column in numpy,
        4x faster than joining each n-gram in Python (a 66b cache's triggers: 30 ms instead of 120)."""
        with self._lock:
            if self._vocab is None:
                self._vocab = np.empty(len(self.vocab), object)
                self._vocab[:] = self.vocab
        ids = decode_grams(grams, self.n, self.vocab_size)
        out = self._vocab[ids[:, 0]]
        for i in range(1, self.n):
            out = out + self._vocab[ids[:, i]]
        return out

    def get(self, row: int) -> list[str]:
        return self.text(self.grams[self._span(row)])

    def get_values(self, row: int) -> list[float]:
        return self.values[self._span(row)].tolist()

    def many(self, rows: np.ndarray) -> list[list[str]]:
        """The lists of many rows (in their order), for exports."""
        lo, hi = np.searchsorted(self.rows, rows), np.searchsorted(self.rows, rows + 1)
        texts = self.texts()
        return [texts[a:b].tolist() for a, b in zip(lo.tolist(), hi.tolist())]

    def texts(self) -> np.ndarray:
        with self._lock:
            if self._texts is None:
                self._texts = self._text_array(self.grams)
        return self._texts

    def folded(self) -> list[str]:
        if self._folded is None:
            self._folded = [t.casefold() for t in self.texts()]
        return self._folded

    def search(self, needle: str) -> np.ndarray:
        """Rows with an n-gram containing `needle` (already case-folded)."""
        if not len(self.rows):
            return np.zeros(0, np.int64)
        hit = np.fromiter((needle in t for t in self.folded()), bool, len(self.grams))
        return self.rows[hit]


def empty_grams(vocab, vocab_size, n=1, values=False) -> Grams:
    return Grams(np.zeros(0, np.int64), np.zeros(0, np.int64), n, vocab, vocab_size,
                  np.zeros(0) if values else None)
