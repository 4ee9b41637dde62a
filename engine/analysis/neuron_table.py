"""The neuron table (one row per neuron) and the layer table (one row per layer), assembled from a
recording and its stored analyses. Numpy only: export and the TUI use it without torch.

Columns that only n-gram layers can answer (coverage, detectors, triggers, suppression) hold None
where the answer is unknown: outside the n-gram layers, and for neurons whose n-gram counts were
not kept. None is never False: a neuron not counted is not reported as "not a detector".
"""
from __future__ import annotations

import numpy as np

from cache import analysis_store as store
from cache.errors import UserError
from cache.reader import CacheReader
from cache.schema import decode_grams
from engine.analysis.positional import KINDS
from engine.tables import Table

NEURON_KINDS = {
    "layer": "int", "neuron": "int", "fire_freq": "float", "dead": "bool", "unigram_coverage": "int",
    "token_detector": "bool", "trigger_tokens": "list", "bigram_detector": "bool", "trigger_bigrams": "list",
    "trigram_detector": "bool", "trigger_trigrams": "list", "suppresses_triggers": "bool",
    "trigger_suppression": "float", "top_promoted": "list", "top_suppressed": "list", "pos_mi": "float",
    "positional": "bool", "pos_type": "str", "pos_strong": "bool", "pos_ranges": "list",
    "g_mean": "float", "g_std": "float", "g_max": "float", "ngram_counted": "bool",
}
LAYER_KINDS = {
    "layer": "int", "rel_depth": "float", "dead_pct": "float", "alive_freq": "float", "ngram_layer": "bool",
    "token_detectors": "int", "bigram_detectors": "int", "trigram_detectors": "int",
    "detected_tokens": "int", "new_tokens": "int", "new_vs_previous": "int", "cumulative_tokens": "int",
    "detected_trigrams": "int", "new_trigrams": "int", "suppress_frac": "float", "positional": "int",
    **{f"pos_{kind}": "int" for kind in KINDS}, "pos_strong": "int",
}


def require(reader: CacheReader, names=("dead", "ngrams", "positional", "suppression")) -> dict[str, dict]:
    missing = [n for n in names if store.stored(reader, n) is None]
    if missing:
        raise UserError(f"{reader.path} has no {', '.join(missing)} analysis yet; run `ffnscope analyze "
                        f"{reader.path}` first")
    return {n: store.read_group(reader, n) for n in names}


def _objects(n: int, fill) -> np.ndarray:
    out = np.empty(n, object)
    out[:] = [fill] * n if not isinstance(fill, list) else [list(fill) for _ in range(n)]
    return out


def gram_text(vocab: list[str], grams: np.ndarray, n: int, vocab_size: int) -> list[str]:
    return ["".join(vocab[t] for t in row) for row in decode_grams(grams, n, vocab_size)]


def neuron_table(reader: CacheReader, layers: list[int] | None = None) -> Table:
    results = require(reader)
    meta = reader.meta
    vocab, vocab_size = reader.vocab, meta["model"]["vocab_size"]
    n_tokens = max(reader.n_tokens, 1)
    ngrams, pos, supp = results["ngrams"], results["positional"], results["suppression"]
    ngram_rows = {int(layer): i for i, layer in enumerate(ngrams["layers"])}
    pos_rows = {int(layer): i for i, layer in enumerate(pos["layers"])}
    chosen = [layer for layer in reader.layers if layers is None or layer in layers]
    tables = [_layer_rows(reader, layer, ngrams, ngram_rows.get(layer), pos, pos_rows[layer], supp, vocab,
                          vocab_size, n_tokens) for layer in chosen]
    if not tables:
        return Table({name: [] for name in NEURON_KINDS}, kinds=NEURON_KINDS)
    return Table.concat(tables)


def _layer_rows(reader, layer, ngrams, nrow, pos, prow, supp, vocab, vocab_size, n_tokens) -> Table:
    d = reader.meta["model"]["d_ffn"]
    fires = reader.primary_fire_count(layer)
    mean = reader.array(layer, "g_sum") / n_tokens
    var = np.maximum(reader.array(layer, "g_sumsq") / n_tokens - mean ** 2, 0.0)
    cols = {
        "layer": np.full(d, layer, np.int64), "neuron": np.arange(d, dtype=np.int64),
        "fire_freq": fires / n_tokens, "dead": fires == 0,
        "unigram_coverage": _objects(d, None), "token_detector": _objects(d, None), "trigger_tokens": _objects(d, []),
        "bigram_detector": _objects(d, None), "trigger_bigrams": _objects(d, []),
        "trigram_detector": _objects(d, None), "trigger_trigrams": _objects(d, []),
        "suppresses_triggers": _objects(d, None), "trigger_suppression": _objects(d, None),
        "top_promoted": _objects(d, []), "top_suppressed": _objects(d, []),
        "pos_mi": pos["mi"][prow], "positional": pos["positional"][prow],
        "pos_type": np.array([KINDS[k - 1] if k else "" for k in pos["kind"][prow]], object),
        "pos_strong": pos["strong"][prow], "pos_ranges": _objects(d, []),
        "g_mean": mean, "g_std": np.sqrt(var), "g_max": reader.array(layer, "g_max").astype(np.float64),
        "ngram_counted": _objects(d, None),
    }
    ranges = pos["ranges"][pos["ranges"][:, 0] == layer] if len(pos["ranges"]) else np.zeros((0, 4), int)
    for _, neuron, start, end in ranges:
        cols["pos_ranges"][neuron].append(f"{start}-{end - 1}")
    if nrow is not None:
        counted = reader.file[f"layers/{layer:03d}/ngram_counted"][:]
        cols["ngram_counted"][:] = counted.tolist()
        coverage = ngrams["n1/coverage"][nrow]
        cols["unigram_coverage"][counted] = coverage[counted].tolist()
        for n, flag, text in ((1, "token_detector", "trigger_tokens"), (2, "bigram_detector", "trigger_bigrams"),
                              (3, "trigram_detector", "trigger_trigrams")):
            cols[flag][counted] = ngrams[f"n{n}/detector"][nrow][counted].tolist()
            mine = ngrams[f"n{n}/covered_layer"] == layer
            neurons = ngrams[f"n{n}/covered_neuron"][mine]
            for neuron, gram in zip(neurons, gram_text(vocab, ngrams[f"n{n}/covered_gram"][mine], n, vocab_size)):
                cols[text][neuron].append(gram)
        mine = supp["layer"] == layer
        for i in np.flatnonzero(mine):
            neuron = supp["neuron"][i]
            cols["suppresses_triggers"][neuron] = bool(supp["suppresses"][i])
            cols["trigger_suppression"][neuron] = float(supp["trigger_score"][i])
            cols["top_promoted"][neuron] = [vocab[t] for t in supp["promoted"][i]]
            cols["top_suppressed"][neuron] = [vocab[t] for t in supp["suppressed"][i]]
    return Table(cols, kinds=NEURON_KINDS)


def layer_table(reader: CacheReader) -> Table:
    results = require(reader)
    meta = reader.meta
    dead, ngrams, pos, supp = (results[k] for k in ("dead", "ngrams", "positional", "suppression"))
    n_layers = meta["model"]["n_layers"]
    primary = meta["recording"]["primary_index"]
    ngram_rows = {int(layer): i for i, layer in enumerate(ngrams["layers"])}
    rows: dict[str, list] = {name: [] for name in LAYER_KINDS}
    for i, layer in enumerate(reader.layers):
        nrow = ngram_rows.get(layer)
        rows["layer"].append(layer)
        rows["rel_depth"].append(layer / max(n_layers - 1, 1))
        rows["dead_pct"].append(100 * float(dead["dead_fraction"][i][primary]))
        rows["alive_freq"].append(float(dead["alive_freq"][i]))
        rows["ngram_layer"].append(nrow is not None)
        for n, name in ((1, "token_detectors"), (2, "bigram_detectors"), (3, "trigram_detectors")):
            rows[name].append(int(ngrams[f"n{n}/detector"][nrow].sum()) if nrow is not None else 0)
        uni = ngrams["n1/ensemble"][nrow] if nrow is not None else [0, 0, 0, 0]
        tri = ngrams["n3/ensemble"][nrow] if nrow is not None else [0, 0, 0, 0]
        for name, value in zip(("detected_tokens", "new_tokens", "new_vs_previous", "cumulative_tokens"), uni):
            rows[name].append(int(value))
        rows["detected_trigrams"].append(int(tri[0]))
        rows["new_trigrams"].append(int(tri[1]))
        mine = supp["layer"] == layer
        rows["suppress_frac"].append(float(supp["suppresses"][mine].mean()) if mine.any() else 0.0)
        kinds = pos["kind"][i][pos["positional"][i]]
        rows["positional"].append(int(pos["positional"][i].sum()))
        for k, kind in enumerate(KINDS, start=1):
            rows[f"pos_{kind}"].append(int((kinds == k).sum()))
        rows["pos_strong"].append(int((pos["strong"][i] & pos["positional"][i]).sum()))
    return Table(rows, kinds=LAYER_KINDS)
