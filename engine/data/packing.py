"""Packing documents into fixed-length token sequences: a start token, documents joined by a separator,
and each token's domain beside it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ffnscope.cache.errors import UserError
from ffnscope.engine.data.sources import Document

_BATCH_DOCS = 256  # documents per tokenizer call
_BATCH_CHARS = 1 << 18

@dataclass
class Packed:
    tokens: np.ndarray  # (n, seq_len) int32
    domains: np.ndarray  # (n, seq_len) uint8, index into domain_names
    domain_names: list[str]
    n_documents: int  # documents with at least one token in `tokens`
    short: bool  # the data held fewer than the n_seqs sequences asked for

    def fingerprint(self) -> str:
        """sha256 of the packed data: equal packings give equal fingerprints."""
        h = hashlib.sha256(f"seq_len={self.tokens.shape[1]};domains={self.domain_names}".encode())
        h.update(np.ascontiguousarray(self.tokens, dtype="<i4").tobytes())
        h.update(np.ascontiguousarray(self.domains, dtype=np.uint8).tobytes())
        return h.hexdigest()


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    """Batches small enough that packing stops soon after it has enough tokens."""
    batch: list[Document] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def pack(documents: Iterable[Document], tokenizer, seq_len: int, n_seqs: int,
         start_id: int | None, sep_id: int | None, on_progress=None) -> Packed:
    """Tokenize documents into one stream (sep_id after each document) and cut it into n_seqs
    sequences of seq_len tokens: start_id, if any, then the next stream tokens. A tail too short
    for a full sequence is dropped. Fewer sequences than asked set `short`; none raise UserError.
    on_progress(tokens_have, tokens_needed), if given, after each batch of documents tokenized."""
    body = seq_len - (start_id is not None)
    if body < 1:
        raise UserError(f"--seq-len must be at least {2 if start_id is not None else 1}")
    if n_seqs < 1:
        raise ValueError(f"n_seqs must be positive, got {n_seqs}")
    need = body * n_seqs
    pieces: list[np.ndarray] = []  # token ids of each document, separator included
    doc_domains: list[int] = []
    domain_ids: dict[str, int] = {}  # in order of first appearance
    have = 0
    for batch in _batches(documents):
        # verbose=False: the "longer than the maximum length" warning does not apply, we cut later.
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)
        for doc, ids in zip(batch, encoded["input_ids"]):
            if sep_id is not None:
                ids = [*ids, sep_id]
            if not ids:
                continue
            pieces.append(np.asarray(ids, dtype=np.int32))
            doc_domains.append(domain_ids.setdefault(doc.domain, len(domain_ids)))
            have += len(ids)
        if on_progress is not None:
            on_progress(min(have, need), need)
        if have >= need:
            break

    n = min(n_seqs, have // body)
    if n == 0:
        raise UserError(f"the data holds only {have} tokens, fewer than one sequence of {seq_len}; "
                        "lower --seq-len or give more data")
    used = n * body
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    tokens = np.concatenate(pieces)[:used].reshape(n, body)
    domains = np.repeat(np.array(doc_domains, dtype=np.int32), lengths)[:used].reshape(n, body)
    if start_id is not None:
        tokens = np.concatenate([np.full((n, 1), start_id, dtype=np.int32), tokens], axis=1)
        domains = np.concatenate([domains[:, :1], domains], axis=1)

    # Number the domains present in name order, so the ids do not depend on the document order.
    names = list(domain_ids)
    present = sorted(names[i] for i in np.unique(domains))
    if len(present) > 256:
        raise UserError(f"the data has {len(present)} domains, more than 256; use fewer 'domain' values")
    remap = np.zeros(len(names), dtype=np.uint8)
    for new, name in enumerate(present):
        remap[domain_ids[name]] = new
    starts = np.cumsum(lengths) - lengths
    return Packed(tokens=tokens, domains=remap[domains], domain_names=present,
                  n_documents=int(np.count_nonzero(starts < used)), short=n < n_seqs)


def special_ids(tokenizer) -> tuple[int | None, int | None]:
    """Start-of-sequence token (BOS, else EOS) and document separator (EOS, else BOS)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos if bos is not None else eos), (eos if eos is not None else bos)
