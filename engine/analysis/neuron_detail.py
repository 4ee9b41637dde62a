"""Everything about one neuron, for the detail view: statistics, triggers with their share of the
neuron's firings, promoted and suppressed tokens, firing frequency by position (the paper's Fig. 7)
and its strongest contexts. Reads only this neuron's column of the big arrays."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache.reader import CacheReader
from engine.analysis.neuron_index import NeuronIndex

CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4


@dataclass
class Context:
    value: float
    sequence: int          # global sequence index
    position: int
    before: list[str]      # token strings, untrusted
    token: str
    after: list[str]


@dataclass
class NeuronDetail:
    layer: int
    neuron: int
    stats: dict            # column -> Python value (None where unknown)
    pos_type: str
    pos_ranges: list[str]
    triggers: dict[int, list[tuple[str, float]]]   # n -> (n-gram, share of the neuron's firings)
    promoted: list[str]
    suppressed: list[str]
    pos_freq: np.ndarray   # (seq_len,) firing frequency at each position
    contexts: list[Context]


STAT_COLUMNS = ("fire_count", "fire_freq", "dead", "unigram_coverage", "token_detector", "bigram_detector",
                "trigram_detector", "suppresses_triggers", "trigger_suppression", "pos_mi", "positional",
                "pos_strong", "g_mean", "g_std", "g_max", "ngram_counted", "npl_pearson", "npl_l2", "background")


def neuron_detail(reader: CacheReader, index: NeuronIndex, row: int) -> NeuronDetail:
    layer, neuron = int(index.cols["layer"][row]), int(index.cols["neuron"][row])
    seq_len = reader.meta["data"]["seq_len"]
    n_seqs = max(reader.n_tokens // seq_len, 1)
    stats = {name: index.known(name, row) for name in STAT_COLUMNS if name in index.cols}
    stats.update(activation_stats(reader, layer, neuron, index.n_tokens))
    triggers = {n: list(zip(index.triggers[n].get(row), index.triggers[n].get_values(row))) for n in (1, 2, 3)}
    pos_freq = reader.array(layer, "pos_fire", (slice(None), neuron)) / n_seqs
    return NeuronDetail(layer, neuron, stats, index.pos_type(row), index.pos_ranges.get(row, []), triggers,
                        index.promoted.get(row), index.suppressed.get(row), pos_freq,
                        top_contexts(reader, index.vocab, layer, neuron))


def activation_stats(reader: CacheReader, layer: int, neuron: int, n_tokens: int) -> dict:
    """Mean, std and max of one neuron's g, read from the cache (not the index's lazy columns, which
    would read every layer)."""
    mean = float(reader.array(layer, "g_sum", neuron)) / n_tokens
    var = float(reader.array(layer, "g_sumsq", neuron)) / n_tokens - mean ** 2
    return {"g_mean": mean, "g_std": max(var, 0.0) ** 0.5, "g_max": float(reader.array(layer, "g_max", neuron))}


def top_contexts(reader: CacheReader, vocab: list[str], layer: int, neuron: int) -> list[Context]:
    values = reader.array(layer, "topk_value", (slice(None), neuron))
    where = reader.array(layer, "topk_index", (slice(None), neuron))
    seq_len = reader.meta["data"]["seq_len"]
    seq_index = reader.file["data/seq_index"][:]
    out = []
    for value, index in zip(values.tolist(), where.tolist()):
        if index < 0:
            continue
        seq, pos = divmod(int(index), seq_len)
        row = int(np.searchsorted(seq_index, seq))
        if row >= len(seq_index) or seq_index[row] != seq:
            continue  # a sequence this cache does not hold (cannot happen for a whole recording)
        tokens = reader.tokens(row)
        text = [vocab[t] for t in tokens[max(pos - CONTEXT_BEFORE, 0):pos + CONTEXT_AFTER + 1].tolist()]
        cut = min(pos, CONTEXT_BEFORE)
        out.append(Context(float(value), seq, pos, text[:cut], text[cut], text[cut + 1:]))
    return out
