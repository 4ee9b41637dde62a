"""The neuron table (one row per neuron) and the layer table (one row per layer), assembled from a
recording and its stored analyses through the neuron index; layer_figures is the one place the
per-layer figures are summed (exports, report, API and the TUI's layers screen). Numpy only: export
and the TUI use it without torch.

`dead` is "never fired" at the recording's firing rule (threshold `tau`, per layer for a relative
rule); `dead_tau0` is the paper's dead, never activated (act > 0 nowhere), always beside it. For a
ReLU model at tau 0 the two are the same.

Columns that only n-gram layers can answer (coverage, detectors, triggers, suppression) hold None
where the answer is unknown: outside the n-gram layers, and for neurons whose n-gram counts were
not kept. None is never False: a neuron not counted is not reported as "not a detector".
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
    rows["suppress_frac"] = [None if v != v else v for v in rows["suppress_frac"]]  # NaN: not known
    return Table(rows, kinds=LAYER_KINDS)


def layer_figures(index: NeuronIndex) -> dict[str, np.ndarray]:
    """Every LAYER_KINDS column, one entry per recorded layer, summed from the neuron index: the one
    place the layer figures are computed (layer table exports, the report, the TUI's layers screen).
    Analyses not stored yet leave zeros in their counts (the TUI shows "-" for them).

    suppress_frac is NaN ("not known") where no token detector has a suppression verdict: a layer
    without detectors, outside the n-gram layers, or before the suppression analysis. 0.0 would claim
    "no detector suppresses its triggers", which nothing measured."""
    cols, n_layers, d = index.cols, len(index.layers), index.d_ffn
    rec = index.prov.recording
    pos = np.repeat(np.arange(n_layers), d)

    def count(mask):
        return np.bincount(pos[mask], minlength=n_layers)

    dead = cols["dead"]
    fires, sumsq = cols["fire_count"], index.column("g_sumsq")
    alive_freq, dead_sq = np.zeros(n_layers), np.zeros(n_layers)
    for i in range(n_layers):  # per layer as engine.analysis.dead.firing_by_layer sums, to the last bit
        rows = slice(i * d, (i + 1) * d)
        alive = fires[rows][~dead[rows]]
        alive_freq[i] = float(alive.mean() / index.n_tokens) if alive.size else 0.0
        total = float(sumsq[rows].sum())
        dead_sq[i] = float(sumsq[rows][dead[rows]].sum() / total) if total > 0 else 0.0
    n_total = index.prov.model.n_layers
    out = {"layer": np.array(index.layers, np.int64),
           "rel_depth": np.array(index.layers) / max(n_total - 1, 1),
           "tau": np.array([rec.layer_tau(layer) for layer in index.layers], np.float64),
           "dead_frac": count(dead) / max(d, 1), "dead_tau0_frac": count(cols["dead_tau0"]) / max(d, 1),
           "dead_sq_frac": dead_sq, "alive_freq": alive_freq,
           "ngram_layer": count(cols["ngram_counted"] != UNKNOWN) > 0}
    for kind in DETECTORS:
        out[f"{kind}_detectors"] = count(cols[f"{kind}_detector"] == 1)
    ensemble = {n: np.array([index.ensembles[n].get(layer, [0, 0, 0, 0]) for layer in index.layers],
                            np.int64).reshape(n_layers, 4) for n in index.ensembles}
    for j, name in enumerate(("detected_tokens", "new_tokens", "new_vs_previous", "cumulative_tokens")):
        out[name] = ensemble[1][:, j]
    out["detected_trigrams"], out["new_trigrams"] = ensemble[3][:, 0], ensemble[3][:, 1]
    detectors = cols["token_detector"] == 1
    known = count(detectors & (cols["suppresses_triggers"] != UNKNOWN))
    suppress = count(detectors & (cols["suppresses_triggers"] == 1))
    out["suppress_frac"] = np.where(known > 0, suppress / np.maximum(known, 1), np.nan)
    out["positional"] = count(cols["positional"])
    for k, kind in enumerate(KINDS, start=1):
        out[f"pos_{kind}"] = count(cols["positional"] & (cols["pos_type"] == k))
    out["pos_strong"] = count(cols["positional"] & cols["pos_strong"])
    return out
