"""The neuron table (one row per neuron) and the layer table (one row per layer), assembled from a
recording and its stored analyses through the neuron index; layer_figures is the one place the
per-layer figures are summed (exports, report, API and the TUI's layers screen). Numpy only: export
and the TUI use it without torch.

`dead` is "never fired" at the recording's firing rule (threshold `tau`, per layer for a relative
rule); `dead_tau0` is the paper's dead, never activated (act > 0 nowhere), always beside it. For a
ReLU model at tau 0 the two are the same.

Columns that only n-gram layers can answer (coverage, detectors, triggers, suppression) hold None
where the answer is unknown: outside the n-gram layers, and for neurons whose n-gram counts were
not kept. None is never False: a neuron not counted is not reported as "not a detector". Likewise
`positional` and `pos_strong` (and the layer table's positional counts) are None where the positional
analysis could not decide (too few sequences per position): "untestable" is not "tested, none found".
"""
from __future__ import annotations

import numpy as np

from ffnscope.cache import analysis_store as store
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.positional import KINDS
from ffnscope.engine.explore.index import DETECTORS, UNKNOWN, NeuronFilter, NeuronIndex
from ffnscope.engine.table.table import Table

NEURON_KINDS = {
    "layer": "int", "neuron": "int", "tau": "float", "fire_freq": "float", "dead": "bool", "dead_tau0": "bool",
    "unigram_coverage": "int",
    # each detector verdict's evidence (index.EVIDENCE_COLUMNS): None where the neuron is no such detector
    **{f"{kind}_trigger_{x}": t for kind in DETECTORS for x, t in (("occurrences", "int"), ("fires", "int"),
                                                                    ("share", "float"))},
    "token_detector": "bool", "trigger_tokens": "list", "bigram_detector": "bool", "trigger_bigrams": "list",
    "trigram_detector": "bool", "trigger_trigrams": "list", "trigger_logit": "float", "suppresses_logit": "bool",
    "trigger_logit_z": "float", "suppresses_z": "bool", "trigger_g": "float", "top_promoted": "list",
    "top_suppressed": "list",
    "pos_mi": "float", "pos_mi_plugin": "float",   # chance-corrected MI, and the paper's plug-in estimate
    "positional": "bool", "pos_type": "str", "pos_strong": "bool", "pos_ranges": "list",
    "g_mean": "float", "g_std": "float", "g_max": "float", "ngram_counted": "bool",
    "npl_pearson": "float", "npl_l2": "float", "background": "bool",   # NPL (engine.npl), None before a fit
    "reproduced": "bool",   # split-half comparison stored by `ffnscope reproduce --into` (engine.explore.reproduce)
}
# shares are fractions (0..1) like fire_freq, never percentages: one unit per quantity in exports
# and --where; the TUI and the report show them as %
LAYER_KINDS = {
    "layer": "int", "rel_depth": "float", "tau": "float", "dead_frac": "float", "dead_tau0_frac": "float",
    "dead_sq_frac": "float", "alive_freq": "float", "ngram_layer": "bool",
    "min_occurrences": "int",  # the support rule the detector counts used (ngrams.min_occurrences)
    "token_detectors": "int", "bigram_detectors": "int", "trigram_detectors": "int",
    "detected_tokens": "int", "new_tokens": "int", "new_vs_previous": "int", "cumulative_tokens": "int",
    "detected_trigrams": "int", "new_trigrams": "int", "suppress_frac_logit": "float",
    "suppress_frac_z": "float", "positional": "int",
    **{f"pos_{kind}": "int" for kind in KINDS}, "pos_strong": "int",
}


def neuron_table(reader: CacheReader, layers: list[int] | None = None) -> Table:
    store.require(reader)
    index = NeuronIndex(reader)
    rows = index.select(NeuronFilter(layers=None if layers is None else tuple(layers)))
    return Table(index.table_columns(rows), kinds=NEURON_KINDS)


def layer_table(reader: CacheReader, index: NeuronIndex | None = None) -> Table:
    """The layer table of a fully analysed recording (UserError otherwise); `index`: the recording's
    open NeuronIndex, when the caller has one (the TUI), else one is built."""
    store.require(reader)
    figures = layer_figures(index or NeuronIndex(reader))
    rows = {name: figures[name].tolist() for name in LAYER_KINDS}
    for name, kind in LAYER_KINDS.items():  # NaN in the figures: not known, exported as None (empty)
        rows[name] = [None if v is None or v != v else int(v) if kind == "int" else v for v in rows[name]]
    return Table(rows, kinds=LAYER_KINDS)


def layer_figures(index: NeuronIndex, dead_sq: bool = True) -> dict[str, np.ndarray]:
    """Every LAYER_KINDS column, one entry per recorded layer, summed from the neuron index: the one
    place the layer figures are computed (layer table exports, the report, the TUI's layers screen).
    dead_sq=False leaves out dead_sq_frac, the one figure that reads every layer's g_sumsq (the screens,
    which do not show it, open without that read).
    A figure nothing measured is NaN, never 0 (the layer table exports None, the views "-"): the n-gram
    counts outside the n-gram layers (and before the ngrams analysis), the positional counts where the
    positional analysis could not decide (too few sequences per position) or has not run, alive_freq of
    a layer without an alive neuron, and dead_sq_frac of a layer whose g is 0 everywhere.

    suppress_frac_logit / suppress_frac_z (the share of token detectors suppressing their triggers in
    each reading, engine.analysis.suppression) are NaN ("not known") where no token detector has a
    suppression verdict: a layer without detectors, outside the n-gram layers, or before the suppression
    analysis. 0.0 would claim "no detector suppresses its triggers", which nothing measured."""
    cols, n_layers, d = index.cols, len(index.layers), index.d_ffn
    rec = index.prov.recording

    def count(mask):  # per layer: the index's rows are layer after layer, d_ffn each
        return np.count_nonzero(mask.reshape(n_layers, d), axis=1)

    dead = cols["dead"]
    fires, sumsq = cols["fire_count"], index.column("g_sumsq") if dead_sq else None
    alive_freq, dead_sq_frac = np.zeros(n_layers), np.zeros(n_layers)
    for i in range(n_layers):  # per layer as engine.analysis.dead.firing_by_layer sums, to the last bit
        rows = slice(i * d, (i + 1) * d)
        alive = fires[rows][~dead[rows]]
        alive_freq[i] = float(alive.mean() / index.n_tokens) if alive.size else np.nan
        if sumsq is not None:
            total = float(sumsq[rows].sum())
            dead_sq_frac[i] = float(sumsq[rows][dead[rows]].sum() / total) if total > 0 else np.nan
    n_total = index.prov.model.n_layers
    out = {"layer": np.array(index.layers, np.int64),
           "rel_depth": np.array(index.layers) / max(n_total - 1, 1),
           "tau": np.array([rec.layer_tau(layer) for layer in index.layers], np.float64),
           "dead_frac": count(dead) / max(d, 1), "dead_tau0_frac": count(cols["dead_tau0"]) / max(d, 1),
           "dead_sq_frac": dead_sq_frac, "alive_freq": alive_freq,
           "ngram_layer": count(cols["ngram_counted"] != UNKNOWN) > 0}
    if not dead_sq:
        del out["dead_sq_frac"]
    counted = out["ngram_layer"]

    def ngram_count(values):  # n-gram figures: not known outside the n-gram layers
        return np.where(counted, values, np.nan)

    for kind in DETECTORS:
        out[f"{kind}_detectors"] = ngram_count(count(cols[f"{kind}_detector"] == 1))
    rule = np.nan if index.min_occurrences is None else index.min_occurrences
    out["min_occurrences"] = np.where(out["ngram_layer"], rule, np.nan)  # NaN: no detector counts here
    ensemble = {n: np.array([index.ensembles[n].get(layer, [0, 0, 0, 0]) for layer in index.layers],
                            np.int64).reshape(n_layers, 4) for n in index.ensembles}
    for j, name in enumerate(("detected_tokens", "new_tokens", "new_vs_previous", "cumulative_tokens")):
        out[name] = ngram_count(ensemble[1][:, j])
    out["detected_trigrams"], out["new_trigrams"] = ngram_count(ensemble[3][:, 0]), ngram_count(ensemble[3][:, 1])
    detectors = cols["token_detector"] == 1
    for reading in ("logit", "z"):
        known = count(detectors & (cols[f"suppresses_{reading}"] != UNKNOWN))
        suppress = count(detectors & (cols[f"suppresses_{reading}"] == 1))
        out[f"suppress_frac_{reading}"] = np.where(known > 0, suppress / np.maximum(known, 1), np.nan)
    positional = cols["positional"] == 1
    decided = count(cols["positional"] != UNKNOWN) > 0  # no verdict: too few sequences, or not analysed

    def pos_count(mask):
        return np.where(decided, count(mask), np.nan)

    out["positional"] = pos_count(positional)
    for k, kind in enumerate(KINDS, start=1):
        out[f"pos_{kind}"] = pos_count(positional & (cols["pos_type"] == k))
    out["pos_strong"] = pos_count(positional & (cols["pos_strong"] == 1))
    return out
