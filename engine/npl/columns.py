"""NPL columns of the neuron table, read from the sidecar (numpy only: export and the TUI use it
without torch).

- npl_pearson: held-out Pearson r of the neuron under the maps into its layer (the mean over the
  fitted maps from other layers; M_{l-1->l} for an adjacent fit);
- npl_l2: held-out L2 error (root mean squared error) likewise: the neuron's predictability score;
- background: the neuron's score is below its layer's random baseline (engine.npl.functional).
Unknown values (no sidecar, no map into the layer, functional analysis not run) are NaN / -1 here
and None in the exported table (engine.explore.index).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ffnscope.cache.npl_store import NplReader, sidecar_path

COLUMNS = {"npl_pearson": "float", "npl_l2": "float", "background": "bool"}


def layer_scores(reader: NplReader, method: str = "exact") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer -> (Pearson r, L2 error) per neuron, averaged over the fitted maps into that layer from
    other layers (self maps are left out: an exact self map is the identity)."""
    into: dict[int, list[int]] = {}
    for i, j in reader.pairs(method):
        if i != j:
            into.setdefault(j, []).append(i)
    out = {}
    for j, sources in sorted(into.items()):
        metrics = [reader.metrics(i, j, method) for i in sources]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: constant neurons
            pearson = np.nanmean(np.stack([m["pearson"] for m in metrics]), axis=0)
        out[j] = (pearson, np.mean(np.stack([m["l2"] for m in metrics]), axis=0))
    return out


def neuron_columns(cache: Path, method: str = "exact", cache_meta: dict | None = None) -> dict[int, dict[str, np.ndarray]]:
    """layer -> {"npl_pearson", "npl_l2": float arrays (NaN unknown), "background": int8 array (-1
    unknown)} for the layers the sidecar knows anything about; no sidecar: {}. A sidecar of another
    recording is refused when cache_meta is given (cache.npl_store.NplReader.check_cache)."""
    path = sidecar_path(cache)
    if not Path(path).exists():
        return {}
    with NplReader(path) as reader:
        if cache_meta is not None:
            reader.check_cache(cache_meta, cache)
        scores = layer_scores(reader, method)
        functional = reader.result("functional")
    background = {}
    if functional is not None:
        arrays = functional["arrays"]
        for row, layer in enumerate(arrays.get("layers", [])):
            background[int(layer)] = arrays["background"][row]
    out = {}
    for layer in sorted(set(scores) | set(background)):
        d = len(scores[layer][0]) if layer in scores else len(background[layer])
        cols = {"npl_pearson": np.full(d, np.nan), "npl_l2": np.full(d, np.nan), "background": np.full(d, -1, np.int8)}
        if layer in scores:
            cols["npl_pearson"][:], cols["npl_l2"][:] = scores[layer]
        if layer in background:
            cols["background"][:] = np.asarray(background[layer], bool)
        out[layer] = cols
    return out
