"""Everything about one neuron, for the detail view: statistics, triggers with their share of the
neuron's firings, promoted and suppressed tokens, firing frequency by position (the paper's Fig. 7)
and its strongest contexts. Reads only this neuron's column of the big arrays.

Contexts rank by act, the quantity the firing rule thresholds (act(gate) for gated FFNs, g for plain
ones), and carry g there, signed: for a gated FFN g = act(gate) * up has the sign of `up`. The
recording keeps the k best sequences over positions >= 1 and one slot for position 0 (the start
token, the same context in every sequence); they merge here, so at most one start-token context shows."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ffnscope.cache.reader import CacheReader
from ffnscope.engine.explore.index import EVIDENCE_COLUMNS, NeuronIndex

CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4


@dataclass
class Context:
    value: float           # act: what the firing rule thresholds, and what contexts rank by
    g: float               # g there, signed (equal to value for plain FFNs)
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
    gated: bool = False    # g = act(gate) * up: contexts' act and g differ
    # n -> (the neuron's fires on the trigger, the trigger's occurrences in the data), in the order of
    # `triggers`; empty for results stored before the detectors' evidence
    trigger_counts: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


STAT_COLUMNS = ("fire_count", "fire_freq", "tau", "dead", "dead_tau0", "unigram_coverage", "token_detector",
                "bigram_detector", "trigram_detector", "trigger_logit", "suppresses_logit", "trigger_logit_z",
                "suppresses_z", "trigger_g", "pos_mi", "positional", "pos_strong", "g_mean", "g_std", "g_max",
                "ngram_counted", "npl_pearson", "npl_l2", "background")


def neuron_detail(reader: CacheReader, index: NeuronIndex, row: int) -> NeuronDetail:
    layer, neuron = int(index.cols["layer"][row]), int(index.cols["neuron"][row])
    prov = reader.provenance
    seq_len = prov.data.seq_len
    n_seqs = max(reader.n_tokens // seq_len, 1)
    stats = {name: index.known(name, row) for name in STAT_COLUMNS if name in index.cols}
    stats.update(activation_stats(reader, layer, neuron, index.n_tokens))
    stats["ngram_bound"] = (prov.recording.ngram_bound or {}).get("fires")
    stats["pos_note"] = index.pos_note  # "too few sequences per position ..." or ""
    stats.update({name: index.known(name, row) for name in EVIDENCE_COLUMNS})
    stats["min_occurrences"] = index.min_occurrences  # the support rule behind the detector verdicts
    triggers = {n: list(zip(index.triggers[n].get(row), index.triggers[n].get_values(row))) for n in (1, 2, 3)}
    counts = {n: [tuple(pair) for pair in index.trigger_counts[n].get_values(row)] for n in (1, 2, 3)}
    pos_freq = reader.array(layer, "pos_fire", (slice(None), neuron)) / n_seqs
    return NeuronDetail(layer, neuron, stats, index.pos_type(row), index.pos_ranges.get(row, []), triggers,
                        index.promoted.get(row), index.suppressed.get(row), pos_freq,
                        top_contexts(reader, index.vocab, layer, neuron), prov.model.gated,
                        counts)


def activation_stats(reader: CacheReader, layer: int, neuron: int, n_tokens: int) -> dict:
    """Mean, std and max of one neuron's g, read from the cache (not the index's lazy columns, which
    would read every layer)."""
    mean = float(reader.array(layer, "g_sum", neuron)) / n_tokens
    var = float(reader.array(layer, "g_sumsq", neuron)) / n_tokens - mean ** 2
    return {"g_mean": mean, "g_std": max(var, 0.0) ** 0.5, "g_max": float(reader.array(layer, "g_max", neuron))}


def top_contexts(reader: CacheReader, vocab: list[str], layer: int, neuron: int) -> list[Context]:
    """The neuron's strongest contexts by act, at most one of them at position 0 (the start token)."""
    rows = (slice(None), neuron)
    k = reader.array(layer, "topk_value", rows).shape[0]
    slots = list(zip(*(reader.array(layer, name, rows).tolist() for name in ("topk_value", "topk_index", "topk_g"))))
    slots.append(tuple(reader.array(layer, name, neuron).item() for name in ("start_value", "start_index", "start_g")))
    slots = sorted((s for s in slots if s[1] >= 0), key=lambda s: (-s[0], s[1]))[:k]
    seq_len = reader.provenance.data.seq_len
    seq_index = reader.seq_index()
    out = []
    for value, index, g in slots:
        seq, pos = divmod(int(index), seq_len)
        row = int(np.searchsorted(seq_index, seq))
        if row >= len(seq_index) or seq_index[row] != seq:
            continue  # a sequence this cache does not hold (cannot happen for a whole recording)
        tokens = reader.tokens(row)
        text = [vocab[t] for t in tokens[max(pos - CONTEXT_BEFORE, 0):pos + CONTEXT_AFTER + 1].tolist()]
        cut = min(pos, CONTEXT_BEFORE)
        out.append(Context(float(value), float(g), seq, pos, text[:cut], text[cut], text[cut + 1:]))
    return out
