"""How a run over packed sequences is cut into batches: whole sequences, about batch_tokens tokens each."""
from __future__ import annotations


def seq_batches(n_seqs: int, seq_len: int, batch_tokens: int) -> list[tuple[int, int]]:
    """-> (lo, hi) sequence ranges of batch_tokens // seq_len sequences (at least one; the last may be short)."""
    per = max(1, batch_tokens // seq_len)
    return [(lo, min(lo + per, n_seqs)) for lo in range(0, n_seqs, per)]
