"""The neuron table (one row per neuron) and the layer table (one row per layer), assembled from a
recording and its stored analyses. Numpy only: export and the TUI use it without torch.

`dead` is "never fired" at the recording's firing rule (threshold `tau`, per layer for a relative
rule); `dead_tau0` is the paper's dead, never activated (act > 0 nowhere), always beside it. For a
ReLU model at tau 0 the two are the same.

Columns that only n-gram layers can answer (coverage, detectors, triggers, suppression) hold None
where the answer is unknown: outside the n-gram layers, and for neurons whose n-gram counts were
not kept. None is never False: a neuron not counted is not reported as "not a detector".
"""
from __future__ import annotations

from ffnscope.cache import analysis_store as store
from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.dead import firing_by_layer
from ffnscope.engine.analysis.neuron_index import NeuronFilter, NeuronIndex
from ffnscope.engine.analysis.positional import KINDS
from ffnscope.engine.tables import Table

NEURON_KINDS = {
    "layer": "int", "neuron": "int", "tau": "float", "fire_freq": "float", "dead": "bool", "dead_tau0": "bool",
    "unigram_coverage": "int",
    "token_detector": "bool", "trigger_tokens": "list", "bigram_detector": "bool", "trigger_bigrams": "list",
    "trigram_detector": "bool", "trigger_trigrams": "list", "suppresses_triggers": "bool",
    "trigger_logit_z": "float", "trigger_g": "float", "top_promoted": "list", "top_suppressed": "list",
    "pos_mi": "float",
    "positional": "bool", "pos_type": "str", "pos_strong": "bool", "pos_ranges": "list",
    "g_mean": "float", "g_std": "float", "g_max": "float", "ngram_counted": "bool",
    "npl_pearson": "float", "npl_l2": "float", "background": "bool",   # NPL (engine.npl), None before a fit
}
# shares are fractions (0..1) like fire_freq, never percentages: one unit per quantity in exports
# and --where; the TUI and the report show them as %
LAYER_KINDS = {
    "layer": "int", "rel_depth": "float", "tau": "float", "dead_frac": "float", "dead_tau0_frac": "float",
    "dead_sq_frac": "float", "alive_freq": "float", "ngram_layer": "bool",
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


def neuron_table(reader: CacheReader, layers: list[int] | None = None) -> Table:
    require(reader)
    index = NeuronIndex(reader)
    rows = index.select(NeuronFilter(layers=None if layers is None else tuple(layers)))
    return Table(index.table_columns(rows), kinds=NEURON_KINDS)


def layer_table(reader: CacheReader) -> Table:
    results = require(reader)
    meta = reader.meta
    ngrams, pos, supp = (results[k] for k in ("ngrams", "positional", "suppression"))
    n_layers = meta["model"]["n_layers"]
    firing = {row.layer: row for row in firing_by_layer(reader)}  # cheap; also right for older dead results
    ngram_rows = {int(layer): i for i, layer in enumerate(ngrams["layers"])}
    rows: dict[str, list] = {name: [] for name in LAYER_KINDS}
    for i, layer in enumerate(reader.layers):
        nrow = ngram_rows.get(layer)
        rows["layer"].append(layer)
        rows["rel_depth"].append(layer / max(n_layers - 1, 1))
        rows["tau"].append(firing[layer].tau)
        rows["dead_frac"].append(firing[layer].dead_primary)
        rows["dead_tau0_frac"].append(firing[layer].dead_tau0)
        rows["dead_sq_frac"].append(firing[layer].dead_sq_share)
        rows["alive_freq"].append(firing[layer].alive_freq)
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
        rows["suppress_frac"].append(float(supp["suppresses"][mine].mean()) if mine.any() else None)  # no detector: undefined
        kinds = pos["kind"][i][pos["positional"][i]]
        rows["positional"].append(int(pos["positional"][i].sum()))
        for k, kind in enumerate(KINDS, start=1):
            rows[f"pos_{kind}"].append(int((kinds == k).sum()))
        rows["pos_strong"].append(int((pos["strong"][i] & pos["positional"][i]).sum()))
    return Table(rows, kinds=LAYER_KINDS)
