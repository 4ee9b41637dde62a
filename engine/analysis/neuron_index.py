"""Every neuron of a recording as flat numpy columns, for filtering and sorting millions of rows at
interactive speed (the TUI) and for building the exported neuron table (one place for that logic).

Row r is neuron `r - offset(layer)` of layer `layer[r]`, layers in recording order. Analyses that
are not stored yet leave their columns unknown: tri-state int8 columns hold -1, float columns NaN.
Per-neuron lists (trigger n-grams, promoted and suppressed tokens, position ranges) exist for few
neurons, so they are dicts keyed by row. Numpy only, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cache import analysis_store as store
from cache.reader import CacheReader
from cache.schema import decode_grams
from engine.analysis.positional import KINDS

UNKNOWN = -1
ANALYSES = ("dead", "ngrams", "positional", "suppression")
DETECTORS = {"token": 1, "bigram": 2, "trigram": 3}
# sortable numeric columns, in the order the TUI offers them
SORT_KEYS = ("layer", "neuron", "fire_freq", "unigram_coverage", "pos_mi", "trigger_suppression",
             "g_mean", "g_std", "g_max")


@dataclass
class NeuronFilter:
    """What the neurons screen and export select. None means "any"."""
    layers: tuple[int, ...] | None = None
    dead: bool | None = None                  # True: dead only, False: alive only
    detector: str | None = None               # token, bigram, trigram, or "any" (of the three)
    positional: str | None = None             # "any" or one of positional.KINDS
    strong_only: bool = False                 # with positional: strong ones only
    freq: tuple[float | None, float | None] = (None, None)   # firing frequency range (fraction)
    mi: tuple[float | None, float | None] = (None, None)     # positional MI range
    trigger: str = ""                         # substring of a trigger n-gram (case-insensitive)
    extra: dict = field(default_factory=dict)  # column -> required value, for columns added later

    def describe(self) -> str:
        parts = []
        if self.dead is not None:
            parts.append("dead" if self.dead else "alive")
        if self.detector:
            parts.append("any detector" if self.detector == "any" else f"{self.detector} detector")
        if self.positional:
            parts.append(("strong " if self.strong_only else "") +
                         ("positional" if self.positional == "any" else self.positional.replace("_", " ")))
        for name, (lo, hi), scale, unit in (("freq", self.freq, 100, "%"), ("MI", self.mi, 1, "")):
            if lo is not None or hi is not None:
                parts.append(f"{name} {_num(lo, scale)}..{_num(hi, scale)}{unit}")
        if self.trigger:
            parts.append(f"trigger ~ {self.trigger!r}")
        parts += [f"{k}={v}" for k, v in self.extra.items()]
        return ", ".join(parts) or "none"


def _num(value, scale) -> str:
    return "" if value is None else f"{value * scale:g}"


class NeuronIndex:
    def __init__(self, reader: CacheReader):
        self.meta = reader.meta
        self.layers: list[int] = list(reader.layers)
        d = self.meta["model"]["d_ffn"]
        self.d_ffn = d
        self.offset = {layer: i * d for i, layer in enumerate(self.layers)}
        n = len(self.layers) * d
        self.n = n
        self.analyses = {name: store.stored(reader, name) is not None for name in ANALYSES}
        vocab = reader.vocab
        self.vocab = vocab
        n_tokens = max(reader.n_tokens, 1)
        cols: dict[str, np.ndarray] = {
            "layer": np.repeat(np.array(self.layers, np.int32), d), "neuron": np.tile(np.arange(d, dtype=np.int32),
                                                                                      len(self.layers)),
        }
        fires = np.empty(n, np.int64)
        g_sum, g_sumsq, g_max = (np.empty(n, np.float64) for _ in range(3))
        for layer in self.layers:
            rows = slice(self.offset[layer], self.offset[layer] + d)
            fires[rows] = reader.primary_fire_count(layer)
            g_sum[rows] = reader.array(layer, "g_sum")
            g_sumsq[rows] = reader.array(layer, "g_sumsq")
            g_max[rows] = reader.array(layer, "g_max")
        mean = g_sum / n_tokens
        cols.update(fire_count=fires, fire_freq=fires / n_tokens, dead=fires == 0, g_mean=mean,
                    g_std=np.sqrt(np.maximum(g_sumsq / n_tokens - mean ** 2, 0.0)), g_max=g_max)
        for name in ("ngram_counted", "token_detector", "bigram_detector", "trigram_detector", "suppresses_triggers"):
            cols[name] = np.full(n, UNKNOWN, np.int8)
        cols["unigram_coverage"] = np.full(n, UNKNOWN, np.int32)
        for name in ("trigger_suppression", "pos_mi"):
            cols[name] = np.full(n, np.nan)
        cols["positional"] = np.zeros(n, bool)
        cols["pos_type"] = np.zeros(n, np.uint8)   # 0: not positional, k: KINDS[k - 1]
        cols["pos_strong"] = np.zeros(n, bool)
        self.cols = cols
        self.triggers: dict[int, dict[int, list[str]]] = {1: {}, 2: {}, 3: {}}
        self.trigger_share: dict[int, dict[int, list[float]]] = {1: {}, 2: {}, 3: {}}
        self.promoted: dict[int, list[str]] = {}
        self.suppressed: dict[int, list[str]] = {}
        self.pos_ranges: dict[int, list[str]] = {}
        if self.analyses["ngrams"]:
            self._load_ngrams(reader)
        if self.analyses["positional"]:
            self._load_positional(reader)
        if self.analyses["suppression"]:
            self._load_suppression(reader)
        self._orders: dict[tuple[str, bool], np.ndarray] = {}
        self._search: list[tuple[int, np.ndarray, list[str]]] | None = None

    # --- loading ----------------------------------------------------------------------------------
    def rows_of(self, layers: np.ndarray, neurons: np.ndarray) -> np.ndarray:
        table = np.full(max(self.layers, default=0) + 1, -1, np.int64)
        table[self.layers] = [self.offset[layer] for layer in self.layers]
        return table[np.asarray(layers, np.int64)] + np.asarray(neurons, np.int64)

    def _load_ngrams(self, reader: CacheReader) -> None:
        ngrams = store.read_group(reader, "ngrams")
        vocab_size = self.meta["model"]["vocab_size"]
        cols = self.cols
        for row, layer in enumerate(ngrams["layers"]):
            layer = int(layer)
            if layer not in self.offset:
                continue
            counted = reader.file[f"layers/{layer:03d}/ngram_counted"][:].astype(bool)
            rows = slice(self.offset[layer], self.offset[layer] + self.d_ffn)
            cols["ngram_counted"][rows] = counted
            coverage = np.where(counted, ngrams["n1/coverage"][row], UNKNOWN)
            cols["unigram_coverage"][rows] = coverage
            for n, kind in ((1, "token_detector"), (2, "bigram_detector"), (3, "trigram_detector")):
                cols[kind][rows] = np.where(counted, ngrams[f"n{n}/detector"][row].astype(np.int8), UNKNOWN)
        for n in (1, 2, 3):
            rows = self.rows_of(ngrams[f"n{n}/covered_layer"], ngrams[f"n{n}/covered_neuron"])
            fires = np.zeros(self.n, np.int64)
            for row, layer in enumerate(ngrams["layers"]):
                if int(layer) in self.offset:
                    start = self.offset[int(layer)]
                    fires[start:start + self.d_ffn] = ngrams[f"n{n}/fires"][row]
            texts = ["".join(self.vocab[t] for t in gram)
                     for gram in decode_grams(ngrams[f"n{n}/covered_gram"], n, vocab_size)]
            share = ngrams[f"n{n}/covered_count"] / np.maximum(fires[rows], 1)
            for r, text, s in zip(rows.tolist(), texts, share.tolist()):
                self.triggers[n].setdefault(r, []).append(text)
                self.trigger_share[n].setdefault(r, []).append(s)

    def _load_positional(self, reader: CacheReader) -> None:
        pos = store.read_group(reader, "positional")
        cols = self.cols
        for row, layer in enumerate(pos["layers"]):
            layer = int(layer)
            rows = slice(self.offset[layer], self.offset[layer] + self.d_ffn)
            cols["pos_mi"][rows] = pos["mi"][row]
            cols["positional"][rows] = pos["positional"][row]
            cols["pos_type"][rows] = pos["kind"][row]
            cols["pos_strong"][rows] = pos["strong"][row]
        ranges = pos["ranges"]
        if len(ranges):
            for r, start, end in zip(self.rows_of(ranges[:, 0], ranges[:, 1]).tolist(), ranges[:, 2].tolist(),
                                     ranges[:, 3].tolist()):
                self.pos_ranges.setdefault(r, []).append(f"{start}-{end - 1}")

    def _load_suppression(self, reader: CacheReader) -> None:
        supp = store.read_group(reader, "suppression")
        if not len(supp["layer"]):
            return
        rows = self.rows_of(supp["layer"], supp["neuron"])
        self.cols["suppresses_triggers"][rows] = supp["suppresses"].astype(np.int8)
        self.cols["trigger_suppression"][rows] = supp["trigger_score"]
        for r, promoted, suppressed in zip(rows.tolist(), supp["promoted"].tolist(), supp["suppressed"].tolist()):
            self.promoted[r] = [self.vocab[t] for t in promoted]
            self.suppressed[r] = [self.vocab[t] for t in suppressed]

    def add_column(self, name: str, values: np.ndarray) -> None:
        """A column computed elsewhere (for example NPL scores), one value per row."""
        if len(values) != self.n:
            raise ValueError(f"column {name} has {len(values)} values for {self.n} neurons")
        self.cols[name] = values
        self._orders = {k: v for k, v in self._orders.items() if k[0] != name}

    # --- selection --------------------------------------------------------------------------------
    def mask(self, f: NeuronFilter) -> np.ndarray:
        cols = self.cols
        mask = np.ones(self.n, bool)
        if f.layers is not None:
            mask &= np.isin(cols["layer"], np.asarray(f.layers, np.int32))
        if f.dead is not None:
            mask &= cols["dead"] == f.dead
        if f.detector == "any":
            mask &= (cols["token_detector"] == 1) | (cols["bigram_detector"] == 1) | (cols["trigram_detector"] == 1)
        elif f.detector:
            mask &= cols[f"{f.detector}_detector"] == 1
        if f.positional:
            mask &= cols["positional"]
            if f.positional != "any":
                mask &= cols["pos_type"] == KINDS.index(f.positional) + 1
            if f.strong_only:
                mask &= cols["pos_strong"]
        for name, (lo, hi) in (("fire_freq", f.freq), ("pos_mi", f.mi)):
            if lo is not None:
                mask &= cols[name] >= lo
            if hi is not None:
                mask &= cols[name] <= hi
        for name, value in f.extra.items():
            mask &= cols[name] == value
        if f.trigger:
            hits = np.zeros(self.n, bool)
            hits[self.search_triggers(f.trigger)] = True
            mask &= hits
        return mask

    def search_triggers(self, needle: str) -> np.ndarray:
        """Rows with a trigger n-gram containing `needle`, case-insensitively."""
        if self._search is None:
            self._search = []
            for n, by_row in self.triggers.items():
                rows = list(by_row)
                self._search.append((n, np.array(rows, np.int64), ["\x00".join(by_row[r]).casefold() for r in rows]))
        needle = needle.casefold()
        found = [rows[[needle in text for text in texts]] for _, rows, texts in self._search if len(rows)]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def order(self, key: str, descending: bool = False) -> np.ndarray:
        """All rows sorted by a column (unknown values last), ties in row order; cached per column."""
        cached = self._orders.get((key, descending))
        if cached is None:
            values = self.cols[key]
            if values.dtype == bool:
                values = values.astype(np.int8)
            if values.dtype.kind == "f":
                unknown = np.isnan(values)
            elif key in ("unigram_coverage",) or values.dtype == np.int8:
                unknown = values == UNKNOWN
            else:
                unknown = np.zeros(self.n, bool)
            keyed = np.where(unknown, 0, values)
            keyed = -keyed if descending else keyed
            cached = np.lexsort((keyed, unknown)).astype(np.int64)
            self._orders[(key, descending)] = cached
        return cached

    def select(self, f: NeuronFilter, sort: str = "layer", descending: bool = False) -> np.ndarray:
        """Rows matching the filter, in sort order."""
        mask = self.mask(f)
        if sort == "layer" and not descending:
            return np.flatnonzero(mask)
        order = self.order(sort, descending)
        return order[mask[order]]

    # --- rows -------------------------------------------------------------------------------------
    def known(self, name: str, row: int):
        """A cell as Python: None where unknown."""
        value = self.cols[name][row]
        if self.cols[name].dtype == np.int8:
            return None if value == UNKNOWN else bool(value)
        if name == "unigram_coverage":
            return None if value == UNKNOWN else int(value)
        if self.cols[name].dtype.kind == "f":
            return None if np.isnan(value) else float(value)
        return value.item()

    def pos_type(self, row: int) -> str:
        kind = int(self.cols["pos_type"][row])
        return KINDS[kind - 1] if kind else ""

    def table_columns(self, rows: np.ndarray) -> dict:
        """The exported neuron table's columns (neuron_table.NEURON_KINDS) for these rows."""
        rows = np.asarray(rows, np.int64)
        cols = self.cols

        def tri(name):
            out = np.empty(len(rows), object)
            out[:] = [None if v == UNKNOWN else bool(v) for v in cols[name][rows].tolist()]
            return out

        def lists(by_row):
            out = np.empty(len(rows), object)
            out[:] = [list(by_row.get(r, ())) for r in rows.tolist()]
            return out

        def nullable(values, convert):
            out = np.empty(len(rows), object)
            out[:] = [None if u else convert(v) for v, u in zip(values.tolist(), unknown.tolist())]
            return out

        coverage = cols["unigram_coverage"][rows]
        unknown = coverage == UNKNOWN
        coverage = nullable(coverage, int)
        score = cols["trigger_suppression"][rows]
        unknown = np.isnan(score)
        score = nullable(score, float)
        return {
            "layer": cols["layer"][rows].astype(np.int64), "neuron": cols["neuron"][rows].astype(np.int64),
            "fire_freq": cols["fire_freq"][rows], "dead": cols["dead"][rows],
            "unigram_coverage": coverage, "token_detector": tri("token_detector"),
            "trigger_tokens": lists(self.triggers[1]), "bigram_detector": tri("bigram_detector"),
            "trigger_bigrams": lists(self.triggers[2]), "trigram_detector": tri("trigram_detector"),
            "trigger_trigrams": lists(self.triggers[3]), "suppresses_triggers": tri("suppresses_triggers"),
            "trigger_suppression": score, "top_promoted": lists(self.promoted),
            "top_suppressed": lists(self.suppressed), "pos_mi": cols["pos_mi"][rows],
            "positional": cols["positional"][rows],
            "pos_type": np.array([KINDS[k - 1] if k else "" for k in cols["pos_type"][rows].tolist()], object),
            "pos_strong": cols["pos_strong"][rows], "pos_ranges": lists(self.pos_ranges),
            "g_mean": cols["g_mean"][rows], "g_std": cols["g_std"][rows],
            "g_max": cols["g_max"][rows], "ngram_counted": tri("ngram_counted"),
        }

    # --- per layer --------------------------------------------------------------------------------
    def per_layer(self) -> dict[str, np.ndarray]:
        """Layer figures (Fig. 1, 3 and 8 of the paper) summed from the rows, one entry per layer."""
        cols, n_layers = self.cols, len(self.layers)
        pos = np.repeat(np.arange(n_layers), self.d_ffn)

        def count(mask):
            return np.bincount(pos[mask], minlength=n_layers)

        alive = ~cols["dead"]
        alive_n = count(alive)
        out = {"layer": np.array(self.layers), "dead_pct": 100 * count(cols["dead"]) / max(self.d_ffn, 1),
               "alive_freq": np.bincount(pos[alive], cols["fire_freq"][alive], n_layers) / np.maximum(alive_n, 1),
               "ngram_layer": count(cols["ngram_counted"] != UNKNOWN) > 0}
        for kind in DETECTORS:
            out[f"{kind}_detectors"] = count(cols[f"{kind}_detector"] == 1)
        detectors = cols["token_detector"] == 1
        suppress = count(detectors & (cols["suppresses_triggers"] == 1))
        out["suppress_frac"] = np.where(out["token_detectors"] > 0, suppress / np.maximum(out["token_detectors"], 1),
                                        np.nan)
        out["positional"] = count(cols["positional"])
        for k, kind in enumerate(KINDS, start=1):
            out[f"pos_{kind}"] = count(cols["positional"] & (cols["pos_type"] == k))
        out["pos_strong"] = count(cols["positional"] & cols["pos_strong"])
        return out
