"""Per-neuron n-gram lists of the neuron index: trigger n-grams, promoted and suppressed tokens. Few
neurons have them, so they stay sorted arrays of encoded n-grams (cache.schema) and become text only
for the rows shown, exported or searched."""
from __future__ import annotations

import threading

import numpy as np

from ffnscope.cache.schema import decode_grams


class Grams:
    """Per-neuron n-grams (triggers, promoted or suppressed tokens) as sorted numpy arrays; their
    text is made only for the rows asked for (a 66b cache has tens of thousands of them)."""

    def __init__(self, rows: np.ndarray, grams: np.ndarray, n: int, vocab: list[str], vocab_size: int,
                 values: np.ndarray | None = None):
        order = np.argsort(rows, kind="stable")
        self.rows, self.grams = rows[order], grams[order]
        self.values = None if values is None else values[order]
        self.n, self.vocab, self.vocab_size = n, vocab, vocab_size
        self._texts: np.ndarray | None = None
        self._folded: list[str] | None = None
        self._lock = threading.Lock()

    def _span(self, row: int) -> slice:
        return slice(*np.searchsorted(self.rows, [row, row + 1]))

    def __contains__(self, row: int) -> bool:
        span = self._span(row)
        return span.stop > span.start

    def text(self, grams: np.ndarray) -> list[str]:
        vocab = self.vocab
        return ["".join(vocab[t] for t in ids) for ids in decode_grams(grams, self.n, self.vocab_size).tolist()]

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
                out = np.empty(len(self.grams), object)
                out[:] = self.text(self.grams)
                self._texts = out
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
