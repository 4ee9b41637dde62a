"""Every neuron of a recording as flat numpy columns, for filtering and sorting millions of rows at
interactive speed (the TUI) and for building the exported neuron table (one place for that logic).

Row r is neuron `r - offset(layer)` of layer `layer[r]`, layers in recording order. Analyses that
are not stored yet leave their columns unknown: tri-state int8 columns hold -1, float columns NaN.
Per-neuron lists (trigger n-grams, promoted and suppressed tokens) exist for few neurons and stay
token ids until a row is shown or exported. Numpy only, no torch.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ffnscope.cache.schema import ANALYSES, REPRODUCE
from ffnscope.cache import analysis_store as store
from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.positional import KINDS, stored_note
from ffnscope.engine.explore.grams import Grams, empty_grams

UNKNOWN = -1
DETECTORS = {"token": 1, "bigram": 2, "trigram": 3}
# a detector verdict's evidence (engine.analysis.ngrams): its covered triggers' occurrences in the data, its
# fires on them and their share of its fires; None where the neuron is no detector of that kind
EVIDENCE = ("occurrences", "fires", "share")
EVIDENCE_COLUMNS = tuple(f"{kind}_trigger_{x}" for kind in DETECTORS for x in EVIDENCE)
ORDERS_KEPT = 4  # whole-table sort orders remembered (12 bytes per neuron each: the order and its sort keys)
UNKNOWN_BITS = np.uint32(0xFFFFFFFF)  # the sort key of an unknown value (NeuronIndex.sort_bits): last
WARM_ORDERS = ("fire_freq", "pos_mi")  # the sorts researchers reach for first, computed ahead (ORDERS_KEPT: 2x2)
# sortable numeric columns, in the order the TUI offers them
SORT_KEYS = ("layer", "neuron", "fire_freq", "unigram_coverage", "token_detector", "bigram_detector",
             "trigram_detector", "trigger_logit", "trigger_logit_z", "trigger_g", "pos_mi", "pos_type", "g_mean",
             "g_std", "g_max", "npl_pearson", "npl_l2", "background")


@dataclass
class NeuronFilter:
    """What the neurons screen and export select. None means "any"."""
    layers: tuple[int, ...] | None = None
    dead: bool | None = None                  # True: dead only, False: alive only (at the firing rule)
    never_activated: bool = False             # the paper's dead only: act > 0 nowhere (tau 0)
    background: bool = False                  # NPL background neurons only
    detector: str | None = None               # token, bigram, trigram, or "any" (of the three)
    positional: str | None = None             # "any" or one of positional.KINDS
    strong_only: bool = False                 # with positional: strong ones only
    freq: tuple[float | None, float | None] = (None, None)   # firing frequency range (fraction)
    mi: tuple[float | None, float | None] = (None, None)     # positional MI range
    trigger: str = ""                         # substring of a trigger n-gram (case-insensitive)
    reproduced: bool | None = None            # split-half comparison (`ffnscope reproduce --into`): True/False

    def describe(self) -> str:
        parts = []
        if self.dead is not None:
            parts.append("dead (never above tau)" if self.dead else "alive")
        if self.never_activated:
            parts.append("never activated (tau 0)")
        if self.detector:
            parts.append("any detector" if self.detector == "any" else f"{self.detector} detector")
        if self.positional:
            parts.append(("strong " if self.strong_only else "") +
                         ("positional" if self.positional == "any" else self.positional.replace("_", " ")))
        for name, (lo, hi), scale, unit in (("freq", self.freq, 100, "%"), ("MI", self.mi, 1, "")):
            if lo is not None or hi is not None:
                parts.append(f"{name} {_num(lo, scale)}..{_num(hi, scale)}{unit}")
        if self.background:
            parts.append("background")
        if self.reproduced is not None:
            parts.append("reproduced" if self.reproduced else "not reproduced")
        if self.trigger:
            parts.append(f"trigger ~ {self.trigger!r}")
        return ", ".join(parts) or "none"


def _argsort_bits(bits: np.ndarray) -> np.ndarray:
    """Positions that sort uint32 `bits`, ties by position: two stable radix passes over 16-bit halves
    (numpy radix-sorts 16-bit integers), about 1.6x faster than one sort of 64-bit (bits, position) keys."""
    low = np.argsort((bits & 0xFFFF).astype(np.uint16), kind="stable")
    return low[np.argsort((bits[low] >> 16).astype(np.uint16), kind="stable")]


def _flip(rows: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`rows` sorted by their sort_bits `bits` (given in that order: ascending, ties in row order) -> the
    same sorted the other way, and their bits, in O(n): the runs of equal values in reverse order, each
    run still in row order, the unknown values still last. What `r` costs instead of a sort."""
    known = int(np.searchsorted(bits, UNKNOWN_BITS))  # the unknown values come last
    first = np.ones(known, bool)  # where each run of equal values starts
    if known:
        np.not_equal(bits[1:known], bits[:known - 1], out=first[1:])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], known)
    # the value at position p of the run [start, end) goes after every run that followed it: to
    # known - end + (p - start)
    target = np.arange(known) + np.repeat(known - ends - starts, ends - starts)
    flipped = np.empty_like(rows)
    flipped[target] = rows[:known]
    flipped[known:] = rows[known:]
    return flipped, np.concatenate([~bits[:known][::-1], bits[known:]])  # sort_bits the other way: ~bits


def _num(value, scale) -> str:
    return "" if value is None else f"{value * scale:g}"


def _read(reader: CacheReader, name: str, keys) -> dict[str, np.ndarray]:
    """The datasets `keys` of a stored analysis, checked as store.read_group checks it; read_group reads every
    dataset, and the index needs few of them to open."""
    store.require(reader, (name,))
    return reader.datasets(f"{store.ROOT}/{name}", keys)


class NeuronIndex:
    # read on first use: the screens do not need them to open; warm() reads the activation statistics
    ACTIVATION = ("g_mean", "g_std", "g_max", "g_sumsq")
    LAZY = ACTIVATION + ("pos_mi_plugin",)  # the paper's plug-in MI: exports only

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self.prov = prov = reader.provenance
        self.layers: list[int] = list(reader.layers)
        d = self.d_ffn = prov.model.d_ffn
        self.offset = {layer: i * d for i, layer in enumerate(self.layers)}
        n = len(self.layers) * d
        self.n = n
        self.analyses = {name: store.stored(reader, name) is not None for name in ANALYSES}
        self.vocab = reader.vocab
        vocab_size = prov.model.vocab_size
        self.n_tokens = max(reader.n_tokens, 1)
        self._lock = threading.RLock()  # the lazy columns, the evidence and the kept orders
        self._orders: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray]] = {}  # _sorted's, oldest first
        fires = np.empty(n, np.int64)
        never = np.empty(n, bool)  # the paper's dead: act > 0 nowhere (tau 0), beside the primary rule's
        same_row = prov.recording.primary_index == prov.recording.tau0_index  # the paper's rule: one read
        for layer in self.layers:
            rows = slice(self.offset[layer], self.offset[layer] + d)
            fires[rows] = reader.primary_fire_count(layer)
            never[rows] = (fires[rows] if same_row else reader.array(layer, "fire_count",
                                                                     prov.recording.tau0_index)) == 0
        cols: dict[str, np.ndarray] = {
            "layer": np.repeat(np.array(self.layers, np.int32), d),
            "neuron": np.tile(np.arange(d, dtype=np.int32), len(self.layers)),
            "fire_count": fires, "fire_freq": fires / self.n_tokens, "dead": fires == 0, "dead_tau0": never,
            "tau": np.repeat(np.array([prov.recording.layer_tau(layer) for layer in self.layers]), d),
        }
        for name in ("ngram_counted", "token_detector", "bigram_detector", "trigram_detector", "suppresses_logit",
                     "suppresses_z"):
            cols[name] = np.full(n, UNKNOWN, np.int8)
        cols["unigram_coverage"] = np.full(n, UNKNOWN, np.int32)
        for name in ("trigger_logit", "trigger_logit_z", "trigger_g", "pos_mi"):
            cols[name] = np.full(n, np.nan)
        # tri-state: unknown before the positional analysis and where it could not decide (too few sequences)
        cols["positional"] = np.full(n, UNKNOWN, np.int8)
        cols["pos_type"] = np.zeros(n, np.uint8)   # 0: not positional (or unknown), k: KINDS[k - 1]
        cols["pos_strong"] = np.full(n, UNKNOWN, np.int8)
        self.cols = cols
        self.triggers = {k: empty_grams(self.vocab, vocab_size, k, True) for k in (1, 2, 3)}
        # the detector evidence (kind -> (rows, occurrences, fires, share) of its detectors only: few, where
        # dense columns would cost 72 bytes a neuron, 170 MB for OPT-66b) and the trigger shares: read on
        # first use (evidence), None until then
        self._evidence: tuple[dict, dict] | None = ({}, {})
        self._covered: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # n -> (rows, fires on the trigger) per trigger
        # per trigger, in the order of self.triggers: (the neuron's fires on it, its occurrences in the data)
        self.trigger_counts = {k: empty_grams(self.vocab, vocab_size, k, True) for k in (1, 2, 3)}
        self.min_occurrences: int | None = None  # the support rule of the stored detectors
        self.promoted = self.suppressed = empty_grams(self.vocab, vocab_size)
        self.pos_ranges: dict[int, list[str]] = {}
        self.ensembles: dict[int, dict[int, np.ndarray]] = {1: {}, 3: {}}  # n -> layer -> ensemble row
        self.pos_note = ""  # "too few sequences per position ..." when no positional neuron could be called
        if self.analyses["ngrams"]:
            self._load_ngrams(reader)
        if self.analyses["positional"]:
            self._load_positional(reader)
        if self.analyses["suppression"]:
            self._load_suppression(reader)
        for name in ("npl_pearson", "npl_l2"):
            cols[name] = np.full(n, np.nan)
        cols["background"] = np.full(n, UNKNOWN, np.int8)
        self.npl_note = self._load_npl(reader)
        cols["reproduced"] = np.full(n, UNKNOWN, np.int8)
        self.reproduce_note = self._load_reproduce(reader)

    # --- loading ----------------------------------------------------------------------------------
    def rows_of(self, layers: np.ndarray, neurons: np.ndarray) -> np.ndarray:
        table = np.full(max(self.layers, default=0) + 1, -1, np.int64)
        table[self.layers] = [self.offset[layer] for layer in self.layers]
        return table[np.asarray(layers, np.int64)] + np.asarray(neurons, np.int64)

    def _load_ngrams(self, reader: CacheReader) -> None:
        """The verdicts and trigger lists; the fire counts behind the evidence and the trigger shares are
        read on first use (_detector_evidence)."""
        ngrams = _read(reader, "ngrams", ["layers", "n1/coverage", "n1/ensemble", "n3/ensemble"] + [
            f"n{k}/{name}" for k in DETECTORS.values() for name in ("detector", "covered_layer", "covered_neuron",
                                                                    "covered_gram", "covered_count",
                                                                    "covered_occurrences")])
        vocab_size = self.prov.model.vocab_size
        cols = self.cols
        for row, layer in enumerate(ngrams["layers"]):
            layer = int(layer)
            if layer not in self.offset:
                continue
            counted = reader.ngram_counted(layer)
            for n in self.ensembles:  # detected, new overall, new vs previous, cumulative (Fig. 3b, 4)
                self.ensembles[n][layer] = ngrams[f"n{n}/ensemble"][row]
            rows = slice(self.offset[layer], self.offset[layer] + self.d_ffn)
            cols["ngram_counted"][rows] = counted
            cols["unigram_coverage"][rows] = np.where(counted, ngrams["n1/coverage"][row], UNKNOWN)
            for k, kind in ((1, "token_detector"), (2, "bigram_detector"), (3, "trigram_detector")):
                cols[kind][rows] = np.where(counted, ngrams[f"n{k}/detector"][row].astype(np.int8), UNKNOWN)
        covered = {}
        for k in (1, 2, 3):
            rows = self.rows_of(ngrams[f"n{k}/covered_layer"], ngrams[f"n{k}/covered_neuron"])
            covered[k] = rows, ngrams[f"n{k}/covered_count"]
            self.triggers[k] = Grams(rows, ngrams[f"n{k}/covered_gram"], k, self.vocab, vocab_size,
                                     lambda k=k: self._detector_evidence()[1][k])
            if f"n{k}/covered_occurrences" in ngrams:
                counts = np.stack([ngrams[f"n{k}/covered_count"], ngrams[f"n{k}/covered_occurrences"]], 1)
                self.trigger_counts[k] = Grams(rows, ngrams[f"n{k}/covered_gram"], k, self.vocab, vocab_size, counts)
        self._covered = covered
        self._evidence = None  # read by _detector_evidence
        rule = store.stored(reader, "ngrams")["params"].get("min_occurrences")
        self.min_occurrences = rule if type(rule) is int else None  # a crafted file's params are only a dict

    @property
    def evidence(self) -> dict[str, tuple[np.ndarray, ...]]:
        """kind -> (rows, occurrences, fires, share) of its detectors only (EVIDENCE)."""
        return self._detector_evidence()[0]

    def _detector_evidence(self) -> tuple[dict[str, tuple[np.ndarray, ...]], dict[int, np.ndarray]]:
        """(evidence, each trigger's share of its neuron's fires by n), read once on first use (the detail
        screen, exports): the per-neuron fire counts behind them are 9 of the ngrams analysis' 10 big
        arrays, two thirds of what reading it at the open cost on a 66b cache."""
        with self._lock:
            if self._evidence is None:
                self._evidence = self._read_evidence()
        return self._evidence

    def _read_evidence(self) -> tuple[dict, dict]:
        ngrams = _read(self.reader, "ngrams", ["layers"] + [f"n{k}/{name}" for k in DETECTORS.values() for name in (
            "fires", "trigger_occurrences", "trigger_fires")])
        fires = {k: np.zeros(self.n, np.int64) for k in (1, 2, 3)}
        parts: dict[str, list[tuple[np.ndarray, ...]]] = {kind: [] for kind in DETECTORS}
        for row, layer in enumerate(ngrams["layers"]):
            layer = int(layer)
            if layer not in self.offset:
                continue
            for k in (1, 2, 3):
                fires[k][self.offset[layer]:self.offset[layer] + self.d_ffn] = ngrams[f"n{k}/fires"][row]
            self._load_evidence(ngrams, row, layer, parts)
        shares = {k: count / np.maximum(fires[k][rows], 1) for k, (rows, count) in self._covered.items()}
        evidence = {}
        for kind, kind_parts in parts.items():
            if kind_parts:
                columns = [np.concatenate(column) for column in zip(*kind_parts)]
                order = np.argsort(columns[0], kind="stable")  # by row, for evidence_values' search
                evidence[kind] = tuple(column[order] for column in columns)
        return evidence, shares

    def _load_evidence(self, ngrams: dict, row: int, layer: int, out: dict[str, list]) -> None:
        """One layer's detector evidence, its detectors only; none for results stored before it (analyze
        recomputes them)."""
        for kind, k in DETECTORS.items():
            if f"n{k}/trigger_occurrences" not in ngrams:
                continue
            start = self.offset[layer]
            neurons = np.flatnonzero(self.cols[f"{kind}_detector"][start:start + self.d_ffn] == 1)
            fires = ngrams[f"n{k}/trigger_fires"][row][neurons].astype(np.int64)
            share = fires / np.maximum(ngrams[f"n{k}/fires"][row][neurons], 1)
            out[kind].append((neurons + start, ngrams[f"n{k}/trigger_occurrences"][row][neurons]
                              .astype(np.int64), fires, share))

    def evidence_values(self, name: str, rows: np.ndarray) -> list:
        """An EVIDENCE_COLUMNS column for these rows, as Python values: None where no such detector."""
        kind, _, what = name.partition("_trigger_")
        out = [None] * len(rows)
        if kind not in self.evidence:
            return out
        have, *values = self.evidence[kind]
        rows = np.asarray(rows, np.int64)
        at = np.minimum(np.searchsorted(have, rows), max(len(have) - 1, 0))
        hit = np.flatnonzero(have[at] == rows) if len(have) else np.zeros(0, np.int64)
        column = values[EVIDENCE.index(what)][at[hit]].tolist()
        for i, value in zip(hit.tolist(), column):
            out[i] = value
        return out

    def _load_positional(self, reader: CacheReader) -> None:
        pos = _read(reader, "positional", ("layers", "mi", "positional", "kind", "strong", "ranges",
                                           "too_few", "n_seqs", "min_seqs", "chance_mi"))  # stored_note's last 4
        self.pos_note = stored_note(pos)
        cols = self.cols
        for row, layer in enumerate(pos["layers"]):
            layer = int(layer)
            rows = slice(self.offset[layer], self.offset[layer] + self.d_ffn)
            cols["pos_mi"][rows] = pos["mi"][row]
            if self.pos_note:  # too few sequences per position: no verdict, not "not positional"
                continue
            cols["positional"][rows] = pos["positional"][row]
            cols["pos_type"][rows] = pos["kind"][row]
            cols["pos_strong"][rows] = pos["strong"][row]
        ranges = pos["ranges"]
        if len(ranges):
            for r, start, end in zip(self.rows_of(ranges[:, 0], ranges[:, 1]).tolist(), ranges[:, 2].tolist(),
                                     ranges[:, 3].tolist()):
                self.pos_ranges.setdefault(r, []).append(f"{start}-{end - 1}")

    def _load_suppression(self, reader: CacheReader) -> None:
        supp = _read(reader, "suppression", ("layer", "neuron", "suppresses_logit", "suppresses_z", "trigger_logit",
                                             "trigger_logit_z", "trigger_g", "promoted", "suppressed"))
        if not len(supp["layer"]):
            return
        rows = self.rows_of(supp["layer"], supp["neuron"])
        for reading in ("logit", "z"):  # suppresses_<reading> == (trigger_<score> < 0)
            self.cols[f"suppresses_{reading}"][rows] = supp[f"suppresses_{reading}"].astype(np.int8)
        self.cols["trigger_logit"][rows] = supp["trigger_logit"]  # the paper's reading
        self.cols["trigger_logit_z"][rows] = supp["trigger_logit_z"]
        self.cols["trigger_g"][rows] = supp["trigger_g"]  # mean g at the triggers' firings: the update's sign
        vocab_size = self.prov.model.vocab_size
        top = supp["promoted"].shape[1]
        self.promoted, self.suppressed = (
            Grams(np.repeat(rows, top), supp[key].reshape(-1).astype(np.int64), 1, self.vocab, vocab_size)
            for key in ("promoted", "suppressed"))

    def _load_npl(self, reader: CacheReader) -> str:
        """NPL predictability scores and background flags from the sidecar, if there is one; a
        sidecar that does not belong to this recording is left out with a note, not an error."""
        from ffnscope.engine.npl.columns import neuron_columns

        try:
            by_layer = neuron_columns(reader.path, cache_meta=reader.meta)  # npl compares the raw dicts
        except UserError as exc:
            return str(exc)
        for layer, values in by_layer.items():
            if layer in self.offset and all(len(v) == self.d_ffn for v in values.values()):
                rows = slice(self.offset[layer], self.offset[layer] + self.d_ffn)
                for name, array in values.items():
                    self.cols[name][rows] = array
        return ""

    def _load_reproduce(self, reader: CacheReader) -> str:
        """`reproduced` from a stored split-half comparison (engine.explore.reproduce), if there is one; one
        of an earlier recording in this file (merged again since) or a damaged one is left out with a note."""
        if reader.analysis_damage(REPRODUCE):
            return f"the stored split-half comparison is damaged ({reader.analysis_damage(REPRODUCE)})"
        info = store.stored(reader, REPRODUCE)
        if info is None:
            return ""
        if info.get("recording") != store.recording_key(reader):
            return "the stored split-half comparison is of an earlier recording in this file; run reproduce again"
        stored = reader.datasets(f"{store.ROOT}/{REPRODUCE}", ("layers", "reproduced"))
        for layer, values in zip(stored["layers"].tolist(), stored["reproduced"]):
            if layer in self.offset:
                self.cols["reproduced"][self.offset[layer]:self.offset[layer] + self.d_ffn] = values
        return ""

    def column(self, name: str) -> np.ndarray:
        """A column, reading the LAZY ones on first use, each only from the arrays it needs (g_max alone:
        one array per layer, not three); thread-safe."""
        if name not in self.cols and name in self.LAZY:
            with self._lock:  # reentrant: g_std is made of g_sumsq and g_mean
                if name not in self.cols:
                    self.cols[name] = self._lazy_column(name)
        return self.cols[name]

    def _lazy_column(self, name: str) -> np.ndarray:
        if name == "pos_mi_plugin":  # the paper's estimate, beside the corrected one (pos_mi)
            out = np.full(self.n, np.nan)
            if self.analyses["positional"]:
                pos = _read(self.reader, "positional", ("layers", "mi_plugin"))
                for row, layer in enumerate(pos["layers"].tolist()):
                    out[self.offset[layer]:self.offset[layer] + self.d_ffn] = pos["mi_plugin"][row]
            return out
        if name == "g_mean":
            return self._read_layers("g_sum") / self.n_tokens
        if name == "g_std":
            mean = self.column("g_mean")
            return np.sqrt(np.maximum(self.column("g_sumsq") / self.n_tokens - mean ** 2, 0.0))
        return self._read_layers(name)  # g_max, g_sumsq

    def _read_layers(self, name: str) -> np.ndarray:
        """A per-neuron array of every layer (cache.schema.LAYER_ARRAYS), as one float64 column."""
        out = np.empty(self.n, np.float64)
        for layer in self.layers:
            out[self.offset[layer]:self.offset[layer] + self.d_ffn] = self.reader.array(layer, name)
        return out

    def warm(self) -> None:
        """Read and decode what the first trigger search, the first sort by an activation statistic and the
        WARM_ORDERS either way would otherwise wait for. Meant for a background thread once the screens are up."""
        for grams in self.triggers.values():
            grams.folded()
        for key in WARM_ORDERS:  # both ways: `r` right after is common (the least firing neurons first)
            self.full_order(key, descending=True)
            self.full_order(key, descending=False)
        for name in self.ACTIVATION:
            self.column(name)

    # --- selection --------------------------------------------------------------------------------
    def mask(self, f: NeuronFilter) -> np.ndarray:
        cols = self.cols
        mask = np.ones(self.n, bool)
        if f.layers is not None:
            mask &= np.isin(cols["layer"], np.asarray(f.layers, np.int32))
        if f.dead is not None:
            mask &= cols["dead"] == f.dead
        if f.never_activated:
            mask &= cols["dead_tau0"]
        if f.background:
            mask &= cols["background"] == 1
        if f.reproduced is not None:
            mask &= cols["reproduced"] == int(f.reproduced)
        if f.detector == "any":
            mask &= (cols["token_detector"] == 1) | (cols["bigram_detector"] == 1) | (cols["trigram_detector"] == 1)
        elif f.detector:
            mask &= cols[f"{f.detector}_detector"] == 1
        if f.positional:
            mask &= cols["positional"] == 1  # no verdict (too few sequences) selects nothing
            if f.positional != "any":
                mask &= cols["pos_type"] == KINDS.index(f.positional) + 1
            if f.strong_only:
                mask &= cols["pos_strong"] == 1
        for name, (lo, hi) in (("fire_freq", f.freq), ("pos_mi", f.mi)):
            if lo is not None:
                mask &= cols[name] >= lo
            if hi is not None:
                mask &= cols[name] <= hi
        if f.trigger:
            hits = np.zeros(self.n, bool)
            hits[self.search_triggers(f.trigger)] = True
            mask &= hits
        return mask

    def search_triggers(self, needle: str) -> np.ndarray:
        """Rows with a trigger n-gram containing `needle`, case-insensitively."""
        needle = needle.casefold()
        return np.unique(np.concatenate([self.triggers[k].search(needle) for k in (1, 2, 3)]))

    def sort_bits(self, key: str, rows: np.ndarray | slice, descending: bool) -> np.ndarray:
        """The uint32 sort key of each of `rows`: the value as order-preserving float32 bits (inverted when
        descending), UNKNOWN_BITS where unknown, so unknown values sort last either way. Values closer than
        float32 resolution count as ties."""
        values = self.column(key)[rows]
        if values.dtype.kind == "f":
            unknown = np.isnan(values)
        elif values.dtype == np.int8 or key == "unigram_coverage":
            unknown = values == UNKNOWN
        elif key == "pos_type":
            unknown = values == 0  # not positional: after every type
        else:
            unknown = None
        bits = values.astype(np.float32).view(np.uint32)
        bits = bits ^ np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
        if descending:
            bits = ~bits
        if unknown is not None:
            bits[unknown] = UNKNOWN_BITS  # no known value maps there: it would be a NaN
        return bits

    def sort_keys(self, key: str, rows: np.ndarray, descending: bool) -> np.ndarray:
        """`rows` ordered by a column (sort_bits), unknown values last, ties in the order of `rows`."""
        return rows[_argsort_bits(self.sort_bits(key, rows, descending))]

    def select(self, f: NeuronFilter, sort: str = "layer", descending: bool = False) -> np.ndarray:
        """Rows matching the filter, in sort order. A large selection is cut out of the whole table's
        order for that key, sorted once and kept (the last few keys): re-sorting millions of rows at
        every filter key would cost a tenth of a second each time."""
        mask = self.mask(f)
        if sort == "layer" and not descending:
            return np.flatnonzero(mask)
        kept = self._orders.get((sort, descending))
        order = None if kept is None else kept[0]
        selected = np.count_nonzero(mask)
        if order is None and selected > self.n // 4:
            order = self.full_order(sort, descending)
        if order is not None:
            return order if selected == self.n else order[mask[order]]  # (the kept order is read-only)
        return self.sort_keys(sort, np.flatnonzero(mask), descending)

    def full_order(self, key: str, descending: bool) -> np.ndarray:
        """Every row sorted by `key` (read-only), remembered for the last ORDERS_KEPT keys; thread-safe."""
        return self._sorted(key, descending)[0]

    def _sorted(self, key: str, descending: bool) -> tuple[np.ndarray, np.ndarray]:
        """(every row sorted by `key`, their sort_bits in that order), kept for the last ORDERS_KEPT keys
        (12 bytes a neuron each); flipped from the other direction's when that is kept (`r`)."""
        kept = self._orders.get((key, descending))
        if kept is None:
            other = self._orders.get((key, not descending))
            if other is None and key == "layer" and descending:  # the rows are in ascending layer order
                other = np.arange(self.n), self.sort_bits(key, slice(None), False)
            if other is not None:
                kept = _flip(*other)
            else:
                bits = self.sort_bits(key, slice(None), descending)
                order = _argsort_bits(bits)
                kept = order, bits[order]
            kept[0].flags.writeable = False  # select hands it out as it is when every row is selected
            with self._lock:
                self._orders[(key, descending)] = kept
                while len(self._orders) > ORDERS_KEPT:
                    self._orders.pop(next(iter(self._orders)))
        return kept

    # --- rows -------------------------------------------------------------------------------------
    def known(self, name: str, row: int):
        """A cell as Python: None where unknown."""
        if name in EVIDENCE_COLUMNS:
            return self.evidence_values(name, np.array([row]))[0]
        column = self.column(name)
        value = column[row]
        if column.dtype == np.int8:
            return None if value == UNKNOWN else bool(value)
        if name == "unigram_coverage":
            return None if value == UNKNOWN else int(value)
        if column.dtype.kind == "f":
            return None if np.isnan(value) else float(value)
        return value.item()

    def pos_type(self, row: int) -> str:
        kind = int(self.cols["pos_type"][row])
        return KINDS[kind - 1] if kind else ""

    def first_triggers(self, row: int) -> list[str]:
        """The lowest-order trigger n-grams of a row (tokens, else bigrams, else trigrams)."""
        for k in (1, 2, 3):
            if row in self.triggers[k]:
                return self.triggers[k].get(row)
        return []

    def table_columns(self, rows: np.ndarray) -> dict:
        """The exported neuron table's columns (neuron_table.NEURON_KINDS) for these rows."""
        rows = np.asarray(rows, np.int64)
        cols = self.cols

        def objects(values) -> np.ndarray:
            out = np.empty(len(rows), object)
            out[:] = values
            return out

        def tri(name):
            return objects([None if v == UNKNOWN else bool(v) for v in cols[name][rows].tolist()])

        coverage = cols["unigram_coverage"][rows].tolist()
        return {
            "layer": cols["layer"][rows].astype(np.int64), "neuron": cols["neuron"][rows].astype(np.int64),
            "tau": cols["tau"][rows], "fire_freq": cols["fire_freq"][rows], "dead": cols["dead"][rows],
            "dead_tau0": cols["dead_tau0"][rows],
            "unigram_coverage": objects([None if c == UNKNOWN else c for c in coverage]),
            "token_detector": tri("token_detector"), "trigger_tokens": objects(self.triggers[1].many(rows)),
            "bigram_detector": tri("bigram_detector"), "trigger_bigrams": objects(self.triggers[2].many(rows)),
            "trigram_detector": tri("trigram_detector"), "trigger_trigrams": objects(self.triggers[3].many(rows)),
            **self._evidence_columns(rows, objects),
            "trigger_logit": objects([None if v != v else v for v in cols["trigger_logit"][rows].tolist()]),
            "suppresses_logit": tri("suppresses_logit"),
            "trigger_logit_z": objects([None if v != v else v for v in cols["trigger_logit_z"][rows].tolist()]),
            "suppresses_z": tri("suppresses_z"),
            "trigger_g": objects([None if v != v else v for v in cols["trigger_g"][rows].tolist()]),
            "top_promoted": objects(self.promoted.many(rows)), "top_suppressed": objects(self.suppressed.many(rows)),
            "pos_mi": objects([None if v != v else v for v in cols["pos_mi"][rows].tolist()]),
            "pos_mi_plugin": objects([None if v != v else v for v in self.column("pos_mi_plugin")[rows].tolist()]),
            "positional": tri("positional"),
            "pos_type": np.array([KINDS[k - 1] if k else "" for k in cols["pos_type"][rows].tolist()], object),
            "pos_strong": tri("pos_strong"), "pos_ranges": objects([list(self.pos_ranges.get(r, ()))
                                                                          for r in rows.tolist()]),
            "g_mean": self.column("g_mean")[rows], "g_std": self.column("g_std")[rows],
            "g_max": self.column("g_max")[rows], "ngram_counted": tri("ngram_counted"),
            "npl_pearson": objects([None if v != v else v for v in cols["npl_pearson"][rows].tolist()]),
            "npl_l2": objects([None if v != v else v for v in cols["npl_l2"][rows].tolist()]),
            "background": tri("background"), "reproduced": tri("reproduced"),
        }

    def _evidence_columns(self, rows: np.ndarray, objects) -> dict:
        """The exported evidence of the detector verdicts: None where the neuron is no such detector."""
        return {name: objects(self.evidence_values(name, rows)) for name in EVIDENCE_COLUMNS}

    # --- per layer --------------------------------------------------------------------------------
    def per_layer(self, dead_sq: bool = True) -> dict[str, np.ndarray]:
        """The layer figures (engine.explore.tables.layer_figures): one row of the layer table per layer;
        dead_sq=False: without dead_sq_frac (what the screens show opens without reading g_sumsq)."""
        from ffnscope.engine.explore.tables import layer_figures

        return layer_figures(self, dead_sq)
