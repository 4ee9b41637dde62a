"""Split-half reproducibility: two recordings of disjoint data from one model with the same settings
(`record --part 1/2` and `--part 2/2`, or different sources) compared finding by finding, neuron by
neuron, on the neuron table that exports read (engine.explore.tables.neuron_table: None = unknown).
The one place this comparison lives: `ffnscope reproduce` and bench/reproducibility.py use it.

Each category gets a code per neuron (NEITHER ... UNDECIDED below); a neuron's `reproduced` is True when
every finding it has in A or B is found in both, False when one is found in one half only, None when
it has none (or only ones the other half cannot decide). With `into`, the codes and `reproduced` are
stored in the merge of A and B (analysis/reproduce), where the neuron table shows `reproduced`.
Numpy only: no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ffnscope.cache import analysis_store as store
from ffnscope.cache import schema
from ffnscope.cache.atomic import same_file
from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import recorded_before
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.job import POSITIONAL_LIMIT
from ffnscope.engine.analysis.positional import stored_note
from ffnscope.engine.explore.tables import neuron_table
from ffnscope.engine.table.table import Table

# per neuron and category: the finding in neither half, in one, in both; in both but with other triggers
# (detectors) or of another type (positional); in one half while the other cannot decide it (None in its
# neuron table: n-gram counts not kept, too few sequences per position); undecided with no finding known
NEITHER, A_ONLY, B_ONLY, BOTH, OTHER, A_LEFT, B_LEFT, UNDECIDED = range(8)
# name -> (label, the neuron table column that holds the verdict)
CATEGORIES = {
    "dead": ("dead (firing rule)", "dead"),
    "dead_tau0": ("dead τ=0 (never activated)", "dead_tau0"),
    "token_detector": ("token detectors", "token_detector"),
    "bigram_detector": ("bigram detectors", "bigram_detector"),
    "trigram_detector": ("trigram detectors", "trigram_detector"),
    "suppresses_logit": ("suppressing (logit)", "suppresses_logit"),
    "suppresses_z": ("suppressing (z)", "suppresses_z"),
    "positional": ("positional neurons", "positional"),
}
TRIGGERS = {"token_detector": "trigger_tokens", "bigram_detector": "trigger_bigrams",
            "trigram_detector": "trigger_trigrams"}
# the verdict's column in exports made before the two suppression readings (it is suppresses_z's)
OLD_COLUMNS = {"suppresses_z": "suppresses_triggers"}
# recording settings that change what a finding is: two recordings differing in one are not compared
SETTINGS = ("firing_rule", "taus", "primary_tau", "tau_rule", "layers", "ngram_layers", "ngram_max_freq")


@dataclass
class Category:
    """One category's counts over a set of neurons. A detector found again has the same triggers;
    a positional neuron found again may have another type (`same_type` counts those that do not)."""
    name: str
    label: str
    a: int                      # neurons with the finding in A (decided in B too)
    b: int
    both: int                   # found again
    left_out: int               # findings of one half that the other half cannot decide
    undecided: int              # neurons left out (None in A or B)
    analysed: bool = True       # False: the column is missing or unknown in A or B (analysed before it)
    other: int | None = None    # detectors: in both halves, other triggers
    same_type: int | None = None    # positional: found again with the same type
    agree: int | None = None    # suppression: verdicts that agree among the token detectors of both
    compared: int | None = None     # suppression: token detectors of both with a verdict in each

    @staticmethod
    def _share(num: int, den: int) -> float | None:
        return num / den if den else None

    @property
    def a_share(self) -> float | None:
        """|A&B| / |A|: the share of A's findings found again in B."""
        return self._share(self.both, self.a)

    @property
    def b_share(self) -> float | None:
        return self._share(self.both, self.b)

    @property
    def jaccard(self) -> float | None:
        return self._share(self.both, self.a + self.b - self.both)

    def as_dict(self) -> dict:
        out = {"name": self.name, "label": self.label, "a": self.a, "b": self.b, "both": self.both,
               "a_share": self.a_share, "b_share": self.b_share, "jaccard": self.jaccard,
               "left_out": self.left_out, "undecided": self.undecided, "analysed": self.analysed}
        for key in ("other", "same_type", "agree", "compared"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class Comparison:
    """Per neuron (the neuron table's rows, layer by layer): each category's code and `reproduced`."""
    layer: np.ndarray
    neuron: np.ndarray
    codes: dict[str, np.ndarray]            # category -> (n,) uint8 code
    not_analysed: set[str] = field(default_factory=set)
    reproduced: np.ndarray = field(init=False)   # (n,) int8: -1 None, 0 False, 1 True

    def __post_init__(self) -> None:
        self.reproduced = reproduced(self.codes)

    def summary(self, rows: np.ndarray | None = None) -> list[Category]:
        """Every category's counts over the rows selected (a bool mask; None: all)."""
        return [summarize(name, self.codes, rows, name not in self.not_analysed) for name in self.codes]


def summarize(name: str, codes: dict[str, np.ndarray], rows: np.ndarray | None = None,
              analysed: bool = True) -> Category:
    code = codes[name] if rows is None else codes[name][rows]
    count = np.bincount(code, minlength=UNDECIDED + 1)
    # a positional neuron of another type is found again; a detector with other triggers is not
    again = count[BOTH] + (count[OTHER] if name == "positional" else 0)
    c = Category(name, CATEGORIES[name][0], int(count[A_ONLY] + count[BOTH] + count[OTHER]),
                 int(count[B_ONLY] + count[BOTH] + count[OTHER]), int(again), int(count[A_LEFT] + count[B_LEFT]),
                 int(count[A_LEFT] + count[B_LEFT] + count[UNDECIDED]), analysed)
    if name in TRIGGERS:
        c.other = int(count[OTHER])
    elif name == "positional":
        c.same_type = int(count[BOTH])
    elif name in ("suppresses_logit", "suppresses_z"):
        # compared: token detectors of both halves with a verdict in each; their codes say the verdicts
        token = codes["token_detector"] if rows is None else codes["token_detector"][rows]
        of_both = (token == BOTH) | (token == OTHER)
        c.compared = int((of_both & (code <= BOTH)).sum())
        c.agree = int((of_both & ((code == NEITHER) | (code == BOTH))).sum())
    return c


def reproduced(codes: dict[str, np.ndarray]) -> np.ndarray:
    """-1 (None): no finding decided in both halves; 0: a finding in one half only (or a detector with
    other triggers); 1: every finding found in both."""
    n = len(next(iter(codes.values()))) if codes else 0
    found, missed = np.zeros(n, bool), np.zeros(n, bool)
    for name, code in codes.items():
        other_found = name == "positional"
        found |= (code == BOTH) | ((code == OTHER) & other_found)
        missed |= (code == A_ONLY) | (code == B_ONLY) | ((code == OTHER) & (not other_found))
    out = np.full(n, -1, np.int8)
    out[found] = 1
    out[missed] = 0
    return out


# --- comparing two neuron tables ------------------------------------------------------------------
def _tri(table: Table, name: str) -> np.ndarray | None:
    """A verdict column as int8 (-1 None, 0, 1); None when the table has no such column."""
    if name not in table:
        return None
    col = table[name]
    if col.dtype != object:
        return col.astype(bool).astype(np.int8)
    return np.array([-1 if v is None else int(bool(v)) for v in col.tolist()], np.int8)


def _codes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    known = (a >= 0) & (b >= 0)
    codes = np.full(len(a), NEITHER, np.uint8)
    codes[known & (a == 1) & (b == 0)] = A_ONLY
    codes[known & (a == 0) & (b == 1)] = B_ONLY
    codes[known & (a == 1) & (b == 1)] = BOTH
    codes[(a == 1) & (b < 0)] = A_LEFT
    codes[(b == 1) & (a < 0)] = B_LEFT
    codes[~known & (a != 1) & (b != 1)] = UNDECIDED
    return codes


def _differ(table_a: Table, table_b: Table, column: str, rows: np.ndarray, as_set: bool) -> np.ndarray:
    """Rows (of `rows`, indices) whose values in the column differ between the tables."""
    a, b = table_a[column][rows].tolist(), table_b[column][rows].tolist()
    if as_set:
        return rows[[frozenset(x) != frozenset(y) for x, y in zip(a, b)]]
    return rows[[x != y for x, y in zip(a, b)]]


def compare_tables(table_a: Table, table_b: Table) -> Comparison:
    """Two neuron tables of the same layers and d_ffn (check_pair), row by row."""
    if len(table_a) != len(table_b) or not np.array_equal(table_a["layer"], table_b["layer"]) \
            or not np.array_equal(table_a["neuron"], table_b["neuron"]):
        raise UserError("the two recordings hold other layers or neurons; compare recordings of one model made "
                        "with the same --layers")
    codes: dict[str, np.ndarray] = {}
    not_analysed: set[str] = set()
    n = len(table_a)
    for name, (_, column) in CATEGORIES.items():
        a, b = (_tri(t, column) for t in (table_a, table_b))
        if name in OLD_COLUMNS:  # an export from before the rename reads as the renamed column
            a = a if a is not None else _tri(table_a, OLD_COLUMNS[name])
            b = b if b is not None else _tri(table_b, OLD_COLUMNS[name])
        if a is None or b is None:
            not_analysed.add(name)
            a, b = (np.full(n, -1, np.int8) if x is None else x for x in (a, b))
        code = _codes(a, b)
        if name in TRIGGERS:  # found again only with the same trigger n-grams
            code[_differ(table_a, table_b, TRIGGERS[name], np.flatnonzero(code == BOTH), True)] = OTHER
        elif name == "positional":
            code[_differ(table_a, table_b, "pos_type", np.flatnonzero(code == BOTH), False)] = OTHER
        codes[name] = code
    token = codes["token_detector"]
    of_both = (token == BOTH) | (token == OTHER)
    for name in ("suppresses_logit", "suppresses_z"):
        # compared among the token detectors of both halves only: elsewhere no verdict to compare
        codes[name][~of_both] = NEITHER
        if of_both.any() and (codes[name][of_both] >= A_LEFT).all():
            not_analysed.add(name)  # a verdict in neither half: analysed before this reading existed
    return Comparison(np.asarray(table_a["layer"], np.int64), np.asarray(table_a["neuron"], np.int64), codes,
                      not_analysed)


# --- the checks up front ---------------------------------------------------------------------------
def _name(reader: CacheReader) -> str:
    return str(reader.path)


def _parts(reader: CacheReader) -> list[tuple[int, int]]:
    rec = reader.provenance.recording
    return sorted(tuple(p) for p in (rec.parts or [rec.part]))


def _parts_text(parts: list[tuple[int, int]]) -> str:
    return ", ".join(f"{i}/{n}" for i, n in parts)


def _complete(reader: CacheReader) -> None:
    if reader.status != schema.COMPLETE:
        raise UserError(f"{reader.path} is a partial recording; finish it with `ffnscope record ... --resume` first")


def _same_settings(a: CacheReader, b: CacheReader, fix: str) -> None:
    """One line naming the first model or recording setting in which b differs from a."""
    ma, mb = a.meta["model"], b.meta["model"]
    for reader in (a, b):
        if recorded_before(reader.meta["model"]["fingerprint"]):
            raise UserError(f"{reader.path} has a model fingerprint of an older ffnscope, which cannot tell whether "
                            "the two recordings are of one model; record it again with this version")
    if ma["fingerprint"] != mb["fingerprint"]:
        raise UserError(f"{b.path} is a recording of another model than {a.path} ({mb.get('name')} vs "
                        f"{ma.get('name')}: the model fingerprints differ); {fix}")
    ra, rb = a.meta["recording"], b.meta["recording"]
    pairs = [("model dtype", ma["dtype"], mb["dtype"]),
             ("seq_len", a.meta["data"]["seq_len"], b.meta["data"]["seq_len"])]
    pairs += [(key, ra.get(key), rb.get(key)) for key in SETTINGS]
    for what, x, y in pairs:
        if x != y:
            raise UserError(f"{b.path} was recorded with another {what} than {a.path} ({y} vs {x}); {fix}")


def _same_analyses(a: CacheReader, b: CacheReader) -> None:
    for name in schema.ANALYSES:
        sa, sb = store.stored(a, name), store.stored(b, name)
        for key in ("params", "inputs"):
            x, y = sa.get(key) or {}, sb.get(key) or {}
            if x != y:
                diff = ", ".join(f"{k}={json.dumps(y.get(k))} vs {json.dumps(x.get(k))}"
                                 for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k))
                raise UserError(f"the {name} analysis of {b.path} used other parameters than {a.path}'s ({diff}); "
                                f"run `ffnscope analyze` on one with the other's --set values")


def _overlapping_sources(a: CacheReader, b: CacheReader) -> str | None:
    """A data source both recordings read (the same path, or one inside the other), or None."""
    def paths(reader):
        return [str(s.get("path", "")) for s in reader.meta["data"]["sources"]]
    for x in paths(a):
        for y in paths(b):
            if x == y or x.startswith(y.rstrip("/") + "/") or y.startswith(x.rstrip("/") + "/"):
                return x
    return None


def check_pair(a: CacheReader, b: CacheReader) -> None:
    """UserError (one line) unless a and b are complete, analysed recordings of disjoint data from one
    model with the same recording settings and analysis parameters. What the files are is checked
    before whether they are analysed: analysing a pair that can never be compared is wasted."""
    _complete(a)
    _complete(b)
    _same_settings(a, b, "compare two recordings of one model made with the same settings")
    if a.meta["data"]["fingerprint"] == b.meta["data"]["fingerprint"]:  # one packing: its parts must not overlap
        shared = np.intersect1d(a.seq_index(), b.seq_index())
        if len(shared):
            raise UserError(f"{a.path} and {b.path} hold {len(shared):,} of the same sequences (parts "
                            f"{_parts_text(_parts(a))} and {_parts_text(_parts(b))} of one recording); compare "
                            "disjoint parts, like --part 1/2 and --part 2/2")
    elif (source := _overlapping_sources(a, b)) is not None:
        raise UserError(f"{a.path} and {b.path} were both recorded from {source}, not as parts of one packing, so "
                        "their data may overlap; record the halves with --part 1/2 and --part 2/2 of one "
                        "recording, or from different sources")
    store.require(a)  # every analysis stored, of the recording the file holds now
    store.require(b)
    _same_analyses(a, b)


def check_merge(merged: CacheReader, a: CacheReader, b: CacheReader) -> None:
    """UserError unless `merged` is the analysed merge of exactly a and b (`ffnscope merge A B`)."""
    fix = f"give the merge of the two: `ffnscope merge {a.path} {b.path} --out MERGED.h5`, then analyze it"
    if a.meta["data"]["fingerprint"] != b.meta["data"]["fingerprint"]:
        raise UserError(f"--into: {a.path} and {b.path} are not parts of one recording (other data), so they "
                        "have no merge to store the comparison in; leave --into out")
    _complete(merged)
    _same_settings(a, merged, fix)
    rec = merged.provenance.recording
    union = np.sort(np.concatenate([a.seq_index(), b.seq_index()]))
    created = {a.meta.get("created"), b.meta.get("created")}
    if rec.parts is None or merged.meta["data"]["fingerprint"] != a.meta["data"]["fingerprint"] \
            or sorted(map(tuple, rec.parts)) != sorted(_parts(a) + _parts(b)) \
            or not np.array_equal(merged.seq_index(), union) or merged.meta.get("created") not in created:
        held = _parts_text(sorted(map(tuple, rec.parts))) if rec.parts else "a whole recording, not a merge"
        raise UserError(f"--into {merged.path} is not the merge of {a.path} and {b.path} (it holds {held}; they "
                        f"hold {_parts_text(_parts(a))} and {_parts_text(_parts(b))}); {fix}")
    store.require(merged)


# --- the command ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What `ffnscope reproduce` found: the comparison and the notes to show beside it."""
    comparison: Comparison
    path_a: Path
    path_b: Path
    parts: tuple[str, str]
    notes: list[str]
    into: Path | None = None

    def as_dict(self) -> dict:
        counts = np.bincount(self.comparison.reproduced + 1, minlength=3)
        return {"a": str(self.path_a), "b": str(self.path_b), "a_parts": self.parts[0], "b_parts": self.parts[1],
                "neurons": int(len(self.comparison.layer)),
                "categories": [c.as_dict() for c in self.comparison.summary()],
                "reproduced": {"true": int(counts[2]), "false": int(counts[1]), "none": int(counts[0])},
                "into": None if self.into is None else str(self.into), "notes": list(self.notes)}


def _distinct(path_a: Path, path_b: Path, into: Path | None) -> None:
    if Path(path_a).resolve() == Path(path_b).resolve() or same_file(path_a, path_b):
        raise UserError(f"{path_a} and {path_b} are the same file; give two recordings of disjoint data, like "
                        "--part 1/2 and --part 2/2 of one recording")
    if into is not None and any(Path(into).resolve() == Path(p).resolve() or same_file(into, p)
                                for p in (path_a, path_b)):
        raise UserError(f"--into {into} is one of the two recordings compared; give their merge "
                        f"(`ffnscope merge {path_a} {path_b} --out MERGED.h5`)")


def reproduce(path_a: Path, path_b: Path, into: Path | None = None) -> Outcome:
    """Check the pair (and the merge) up front, compare, and with `into` store the per-neuron result in
    the merge. The caller holds the locks (shared on a and b, exclusive on into)."""
    _distinct(path_a, path_b, into)
    with CacheReader(path_a, "comparing it") as a, CacheReader(path_b, "comparing it") as b:
        check_pair(a, b)
        key = None
        if into is not None:
            with CacheReader(into, "storing the comparison in it") as merged:
                check_merge(merged, a, b)
                key = store.recording_key(merged)
        notes = []
        for reader in (a, b):
            pos = store.read_unchecked(reader, "positional", POSITIONAL_LIMIT)
            note = stored_note(pos) if pos is not None else ""
            if note:
                notes.append(f"{reader.path}: {note}")
        comparison = compare_tables(neuron_table(a), neuron_table(b))
        params = {"categories": list(comparison.codes), "not_analysed": sorted(comparison.not_analysed),
                  "a": _identity(a), "b": _identity(b)}
        parts = (_parts_text(_parts(a)), _parts_text(_parts(b)))
    if into is not None:
        store.write_results(Path(into), [result(comparison, params)], key)
    return Outcome(comparison, Path(path_a), Path(path_b), parts, notes, into)


def _identity(reader: CacheReader) -> dict:
    """What the stored result says of each half (params): enough to tell which recordings were compared."""
    return {"path": str(reader.path), "created": reader.meta.get("created"), "parts": _parts(reader),
            "data": reader.meta["data"]["fingerprint"]}


def result(comparison: Comparison, params: dict) -> store.Result:
    """analysis/reproduce: `layers`, `codes` (categories, L, d_ffn) uint8 and `reproduced` (L, d_ffn) int8."""
    layers = np.unique(comparison.layer)
    d = len(comparison.layer) // max(len(layers), 1)
    out = store.Result(schema.REPRODUCE, params)
    out.put("layers", layers.astype(np.int64))
    out.put("codes", np.stack([comparison.codes[name].reshape(len(layers), d) for name in comparison.codes]))
    out.put("reproduced", comparison.reproduced.reshape(len(layers), d))
    return out
