"""The checks a recording cache passes when it is opened for reading, so no view or analysis meets a
missing key, a value of the wrong type or range, or a dataset of another shape than the meta implies
(docs/cache-format.md). Attributes and shapes only: no big array is read (a real cache is many GB),
only the analyses' small index arrays whose values the views use as indices.

check_recording (called by cache.store.open_file, so by every reader, merge and resume) refuses a
damaged recording with one line naming the file, the key or dataset, what was expected and the fix.
check_analyses says which stored analyses are damaged: the reader refuses to hand those out, and
`analyze` computes them again (cache.analysis_store.is_current).

Values from the file are shown cut short (shown()); the CLI and the TUI escape the whole message."""
from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.errors import UserError

MAX_META_CHARS = 64 << 20  # a recording's meta is a few KB; this bounds the parse, not any real cache
MAX_TEXT = 1 << 16         # any string in the meta: 16 paths of PATH_MAX; a 20 MB one only slows every view
MAX_DEPTH = 16             # nesting of the meta (a real one nests 4 deep)
FIX = "the file is damaged or was not written by ffnscope; record it again or restore a good copy"


class Damage(Exception):
    """One problem, in words: which key or dataset, what it is, what was expected."""


def shown(value) -> str:
    """A value from the file as a message shows it: short whatever it holds."""
    if isinstance(value, str):
        return json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return type(value).__name__


def _hdf5(exc: Exception) -> str:
    lines = str(exc).splitlines() or [""]
    return f"HDF5 could not read it ({exc.__class__.__name__}: {lines[0][:160]})"


# --- the meta -----------------------------------------------------------------------------------
def parse_meta(f: h5py.File) -> dict:
    """The `meta` attribute as a dict; Damage when it is missing, not text, not JSON or not an object."""
    raw = f.attrs.get("meta")
    if raw is None:
        raise Damage("the attribute meta is missing")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Damage("the attribute meta is not UTF-8 text") from None
    if not isinstance(raw, str):
        raise Damage(f"the attribute meta is {type(raw).__name__}, expected JSON text")
    if len(raw) > MAX_META_CHARS:
        raise Damage(f"the attribute meta is {len(raw):,} characters, expected a few thousand")
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise Damage(f"meta nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise Damage(f"meta is not JSON ({str(exc)[:80]})") from None
    if not isinstance(meta, dict):
        raise Damage(f"meta is {shown(meta)}, expected a JSON object")
    _bounded(meta, "meta", 0)
    return meta


def _bounded(value, where: str, depth: int) -> None:
    """Every string short and the nesting shallow, so nothing shown or walked later is slow."""
    if depth > MAX_DEPTH:
        raise Damage(f"{where} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise Damage(f"{where} is a text of {len(value):,} characters, expected at most {MAX_TEXT:,}")
    if isinstance(value, dict):
        for key, item in value.items():
            if len(key) > MAX_TEXT:
                raise Damage(f"{where} has a key of {len(key):,} characters")
            _bounded(item, f"{where}{' ' if where == 'meta' else '.'}{key[:40]}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _bounded(item, f"{where}[{i}]", depth + 1)


def _integer(lo: int = 0, hi: int = 2 ** 53):
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise Damage(f"{where} is {shown(value)}, expected an integer{_range(lo, hi)}")
        return value
    return check


def _range(lo, hi) -> str:
    return f" >= {lo}" if hi >= 1 << 40 else f" in {lo}..{hi}"


def _number(lo: float = -math.inf, hi: float = math.inf):
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            bounds = "" if (lo, hi) == (-math.inf, math.inf) else f" >= {lo:g}" if hi == math.inf else \
                f" in [{lo:g}, {hi:g}]"
            raise Damage(f"{where} is {shown(value)}, expected a finite number{bounds}")
        return value
    return check


def _text(value, where):
    if not isinstance(value, str):
        raise Damage(f"{where} is {shown(value)}, expected a text")
    return value


def _boolean(value, where):
    if not isinstance(value, bool):
        raise Damage(f"{where} is {shown(value)}, expected true or false")
    return value


def _nullable(check):
    return lambda value, where: None if value is None else check(value, where)


def _list(check, min_len: int = 0, max_len: int = 2 ** 31):
    def each(value, where):
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            size = "" if (min_len, max_len) == (0, 2 ** 31) else f" of {min_len}" if min_len == max_len else \
                f" of {min_len}..{max_len} entries" if max_len < 2 ** 31 else f" of at least {min_len}"
            raise Damage(f"{where} is {shown(value)}, expected a list{size}")
        return [check(item, f"{where}[{i}]") for i, item in enumerate(value)]
    return each


def _object(value, where):
    if not isinstance(value, dict):
        raise Damage(f"{where} is {shown(value)}, expected an object")
    return value


def _pair(lo: int, form: str):
    """[a, b], integers, lo <= a <= b; `form` names them for the message."""
    def check(value, where):
        pair = _list(_integer(lo), 2, 2)(value, where)
        if pair[0] > pair[1]:
            raise Damage(f"{where} is {pair}, expected {form}")
        return pair
    return check


class _Section:
    """One object of the meta: its keys fetched with a check each."""

    def __init__(self, value, where: str):
        self.d, self.where = _object(value, where), where

    def _at(self, key: str) -> str:
        return f"{self.where}{' ' if self.where == 'meta' else '.'}{key}"

    def need(self, key: str, check):
        if key not in self.d:
            raise Damage(f"{self._at(key)} is missing")
        return check(self.d[key], self._at(key))

    def may(self, key: str, check, default=None):
        return check(self.d[key], self._at(key)) if key in self.d else default


def _section(meta: dict, name: str) -> _Section:
    if name not in meta:
        raise Damage(f"meta {name} is missing")
    return _Section(meta[name], f"meta {name}")


def check_meta(meta: dict) -> None:
    """Every key the readers use (cache.provenance), of the right type and in range."""
    top = _Section(meta, "meta")
    top.may("tool_version", _text)
    top.may("schema_version", _integer())
    top.may("created", _text)
    model, tok, data, rec = (_section(meta, name) for name in ("model", "tokenizer", "data", "recording"))
    for key in ("spec", "name", "family", "fingerprint", "activation", "dtype"):
        model.need(key, _text)
    model.may("spec_given", _nullable(_text))
    model.may("model_type", _text)
    n_layers = model.need("n_layers", _integer(1, 1 << 20))
    for key in ("d_model", "d_ffn", "vocab_size"):
        model.need(key, _integer(1, 1 << 40))
    model.may("gated", _nullable(_boolean))
    model.may("config", _object)
    model.may("weights_from", _nullable(_object))  # a dequantized .gguf's; views read it defensively
    tok.may("name", _nullable(_text))
    tok.may("size", _integer())
    for key in ("start_id", "sep_id"):
        tok.may(key, _nullable(_integer()))

    data.need("sources", _list(_object))
    for i, source in enumerate(data.d["sources"]):
        for key in ("path", "kind"):
            if source.get(key) is not None:
                _text(source[key], f"meta data.sources[{i}].{key}")
    data.need("fingerprint", _text)
    data.need("seq_len", _integer(1, 1 << 40))
    data.may("field", _nullable(_text))
    for key in ("seed", "n_seqs_total", "tokens_total"):
        data.may(key, _integer())
    data.may("domain_names", _list(_text, 0, 256))  # data/domains holds uint8 indices into them
    data.may("n_documents", _nullable(_integer()))
    data.may("notes", _list(_text))

    taus = rec.need("taus", _list(_number(), 1, 256))
    if any(b <= a for a, b in zip(taus, taus[1:])) or 0.0 not in taus:
        raise Damage(f"meta recording.taus is {shown(taus)[:40]}, expected ascending thresholds, 0 among them")
    rule = rec.may("tau_rule", _text, "absolute")
    kind, _, value = rule.partition(":")
    if rule != "absolute" and (kind not in ("quantile", "median-max") or not _finite(value)):
        raise Damage(f"meta recording.tau_rule is {shown(rule)}, expected absolute, quantile:Q or median-max:F")
    relative = rule != "absolute"
    index = rec.need("primary_index", _integer(0, len(taus) if relative else len(taus) - 1))
    primary = rec.may("primary_tau", _nullable(_number()))
    if relative and index != len(taus):
        raise Damage(f"meta recording.primary_index is {index}, expected {len(taus)} (the relative rule's row)")
    if not relative and primary != taus[index]:
        raise Damage(f"meta recording.primary_tau is {shown(primary)}, expected taus[primary_index] = {taus[index]:g}")
    layers = rec.need("layers", _list(_integer(0, n_layers - 1), 1))
    if len(set(layers)) != len(layers):
        raise Damage("meta recording.layers names a layer twice")
    ngram = rec.need("ngram_layers", _list(_integer()))
    if not set(ngram) <= set(layers) or len(set(ngram)) != len(ngram):
        raise Damage(f"meta recording.ngram_layers is {shown(ngram)}, expected distinct layers among "
                     "recording.layers")
    layer_taus = rec.may("layer_taus", _nullable(_object)) or {}  # null or absent: older caches
    for key, tau in layer_taus.items():
        if not key.isdigit():
            raise Damage(f"meta recording.layer_taus has the key {shown(key)}, expected layer numbers")
        _nullable(_number())(tau, f"meta recording.layer_taus.{key}")
    if relative and any(layer_taus.get(str(layer)) is None for layer in layers):
        raise Damage("meta recording.layer_taus lacks a recorded layer's threshold (a relative rule has one each)")
    rec.may("firing_rule", _text)
    freq = rec.may("ngram_max_freq", lambda v, w: v if v == "auto" else _number(0.0)(v, w))
    bound = rec.may("ngram_bound", _nullable(_object))
    if bound is not None:
        bound = _Section(bound, "meta recording.ngram_bound")
        bound.need("fires", _integer())
        bound.need("freq", _number())
        if freq not in (None, "auto"):
            bound.need("tokens", _integer())
    for key in ("calib_tokens", "batch_tokens"):
        rec.may(key, _nullable(_integer()))
    for key in ("topk", "samples", "n_seqs_total", "part_tokens", "shard_tokens"):
        rec.may(key, _integer())
    rec.need("n_shards", _integer())
    rec.may("sample_rate", _number(0.0, 1.0))
    rec.may("part", _pair(1, "[i, n] with 1 <= i <= n"))
    rec.may("parts", _nullable(_list(_pair(1, "[i, n] with 1 <= i <= n"))))
    rec.may("seq_range", _pair(0, "[lo, hi] with lo <= hi"))
    rec.may("tokens_per_s", _nullable(_number(0.0)))
    rec.may("merged_from", _list(_text))


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# --- the layout ---------------------------------------------------------------------------------
INTEGER, FLOAT, BOOL, BYTES = "iu", "f", "b", "u"
_KIND_NAMES = {INTEGER: "integers", FLOAT: "floats", BOOL: "booleans", BYTES: "bytes"}
_GROUP = "group"


class _Tree:
    """Every object under a group, by path: a dataset's (shape, dtype) or _GROUP. One pass of HDF5's
    low-level visit opens each object header once (a damaged one fails here, not in a view later);
    the checks then look shapes up without touching the file."""

    def __init__(self, group: h5py.Group, prefix: str = ""):
        self.prefix, self.items = prefix, {}

        def visit(name: bytes) -> None:
            obj = h5py.h5o.open(group.id, name)
            self.items[name.decode("utf-8", "replace")] = (obj.shape, obj.dtype) \
                if isinstance(obj, h5py.h5d.DatasetID) else _GROUP if isinstance(obj, h5py.h5g.GroupID) else "other"
        h5py.h5o.visit(group.id, visit)

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def children(self, name: str) -> set[str]:
        depth = name.count("/") + 1
        return {key.split("/")[-1] for key in self.items if key.startswith(name + "/") and key.count("/") == depth}

    def group(self, name: str) -> None:
        if name not in self.items:
            raise Damage(f"group {self.prefix}{name} is missing")
        if self.items[name] != _GROUP:
            raise Damage(f"{self.prefix}{name} is not a group")

    def dataset(self, name: str, kinds: str, shape: tuple, dims: str = "") -> tuple:
        """The shape of dataset `name`, which must have `shape` (None: any length) and hold `kinds`; `dims`
        says where the expected lengths come from (the meta keys), for the message."""
        where, item = f"{self.prefix}{name}", self.items.get(name)
        if item is None:
            raise Damage(f"dataset {where} is missing")
        if not isinstance(item, tuple):
            raise Damage(f"{where} is a {item}, expected a dataset")
        found, dtype = item
        if len(found) != len(shape) or any(w is not None and w != n for w, n in zip(shape, found)):
            want = ", ".join("any" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "")
            want = f"({want})"
            raise Damage(f"dataset {where} has shape {found}, expected {want}" + (f" ({dims})" if dims else ""))
        if int(np.prod(found)) and dtype.kind not in kinds:
            raise Damage(f"dataset {where} holds {dtype}, expected {_KIND_NAMES[kinds]}")
        return found

    def columns(self, name: str, kinds: dict[str, str]) -> int:
        """Equal-length 1-D columns of group `name` (column -> kinds; a column ending in '?' may be absent)
        -> their length."""
        self.group(name)
        lengths = set()
        for column, kind in kinds.items():
            if column.endswith("?") and f"{name}/{column[:-1]}" not in self:
                continue
            lengths.add(self.dataset(f"{name}/{column.rstrip('?')}", kind, (None,))[0])
        if len(lengths) > 1:
            sizes = ", ".join(map(str, sorted(lengths)))
            raise Damage(f"the columns of {self.prefix}{name} differ in length ({sizes})")
        return lengths.pop() if lengths else 0


_D, _T, _V = "meta model.d_ffn", "meta data.seq_len", "meta model.vocab_size"


def check_layout(f: h5py.File, meta: dict) -> None:
    """Every dataset the readers use, with the shape and kind the meta implies (docs/cache-format.md)."""
    model, rec = meta["model"], meta["recording"]
    d, seq_len, vocab = model["d_ffn"], meta["data"]["seq_len"], model["vocab_size"]
    rows = len(rec["taus"]) + (rec.get("tau_rule", "absolute") != "absolute")
    status = f.attrs.get("status")
    if status not in (schema.PARTIAL, schema.COMPLETE):
        raise Damage(f"the attribute status is {shown(status)}, expected {schema.COMPLETE} or {schema.PARTIAL}")
    done = f.attrs.get("shards_done")
    if isinstance(done, (bool, np.bool_)) or not isinstance(done, (int, np.integer)) or done < 0:
        raise Damage(f"the attribute shards_done is {shown(done)}, expected a count")
    tree = _Tree(f)
    n_seqs = tree.dataset("data/tokens", INTEGER, (None, seq_len), f"sequences, {_T}")[0]
    tree.dataset("data/domains", INTEGER, (n_seqs, seq_len), "data/tokens' shape")
    tree.dataset("data/seq_index", INTEGER, (n_seqs,), "a row of data/tokens each")
    tree.dataset("data/unigram", INTEGER, (vocab,), _V)
    for name in ("data/gram2", "data/gram3"):
        if name in tree:
            tree.columns(name, {"gram": INTEGER, "count": INTEGER})
    for name in ("tokenizer/vocab", "tokenizer/pieces"):
        tree.dataset(f"{name}/bytes", BYTES, (None,))
        tree.dataset(f"{name}/offsets", INTEGER, (vocab + 1,), f"{_V} + 1")
    tree.group("layers")
    found, wanted = tree.children("layers"), {f"{layer:03d}" for layer in rec["layers"]}
    if found != wanted:
        extra, missing = sorted(found - wanted), sorted(wanted - found)
        raise Damage(f"group layers/{(extra or missing)[0][:40]} is {'not in' if extra else 'missing from'} "
                     f"the file's layer list (meta recording.layers)")
    ngram_layers = set(rec["ngram_layers"])
    per_tau = f"a row per meta recording.taus{' + 1' if rows > len(rec['taus']) else ''}, {_D}"
    topk = None  # the same k in every layer: the first layer's
    for layer in rec["layers"]:
        group = f"layers/{layer:03d}"
        tree.group(group)
        shapes = {"fire_count": (INTEGER, (rows, d), per_tau), "pos_fire": (INTEGER, (seq_len, d), f"{_T}, {_D}"),
                  **{name: (kinds, (topk, d), f"top-k, {_D}") for name, kinds in
                     (("topk_value", FLOAT), ("topk_index", INTEGER), ("topk_g", FLOAT))},
                  **{name: (FLOAT, (d,), _D) for name in ("g_sum", "g_sumsq", "g_max", "start_value", "start_g")},
                  "start_index": (INTEGER, (d,), _D)}
        if f"{group}/{schema.POS_FIRE_DELTA}" in tree:
            shapes[schema.POS_FIRE_DELTA] = (INTEGER, (seq_len, d), f"{_T}, {_D}")
        for name, (kinds, shape, dims) in shapes.items():
            shape = tree.dataset(f"{group}/{name}", kinds, shape, dims)
            topk = shape[0] if name == "topk_value" else topk
        if (layer in ngram_layers) != (f"{group}/ngram_counted" in tree):
            raise Damage(f"dataset {group}/ngram_counted is {'missing' if layer in ngram_layers else 'there'}, "
                         f"expected it in the n-gram layers only (meta recording.ngram_layers)")
        if layer in ngram_layers:
            tree.dataset(f"{group}/ngram_counted", BOOL, (d,), _D)
            for n in (1, 2, 3):
                tree.columns(f"{group}/ngram{n}", {"gram": INTEGER, "neuron": INTEGER, "count": INTEGER,
                                                   "g_sum?": FLOAT})
    n_samples = tree.dataset("samples/index", INTEGER, (None,))[0]
    tree.dataset("samples/acts", FLOAT, (len(rec["layers"]), n_samples, d),
                 "meta recording.layers, samples/index, " + _D)


def check_recording(f: h5py.File, path: Path) -> None:
    """UserError unless the meta and the layout are what readers expect (a complete or partial cache)."""
    try:
        meta = parse_meta(f)
        check_meta(meta)
        check_layout(f, meta)
    except Damage as exc:
        raise UserError(f"{path} cannot be read: {exc}; {FIX}") from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # HDF5 meeting a damaged file
        raise UserError(f"{path} cannot be read: {_hdf5(exc)}; {FIX}") from None


# --- the stored analyses ------------------------------------------------------------------------
def check_analyses(f: h5py.File, meta: dict) -> dict[str, str]:
    """name -> what is wrong, for each stored analysis (analysis/<name>) a view could not use."""
    root = f.get("analysis")
    if root is None or not isinstance(root, h5py.Group):
        return {}
    damaged = {}
    for name in (*schema.ANALYSES, schema.REPRODUCE):
        if name not in root:
            continue
        try:
            _analysis(root[name], name, meta)
        except Damage as exc:
            damaged[name] = str(exc)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            damaged[name] = _hdf5(exc)
    return damaged


def damaged_analysis(path: Path, name: str, problem: str) -> UserError:
    if name == schema.REPRODUCE:  # analyze never writes it: the comparison that did is the fix
        return UserError(f"{path}: its stored split-half comparison is damaged ({problem}); run `ffnscope "
                         f"reproduce A.h5 B.h5 --into {path}` again")
    return UserError(f"{path}: its {name} analysis is damaged ({problem}); run `ffnscope analyze {path}` to "
                     "compute it again")


def _analysis(group, name: str, meta: dict) -> None:
    if not isinstance(group, h5py.Group):
        raise Damage(f"analysis/{name} is not a group")
    for key, kind in (("params", dict), ("recording", str), ("inputs", dict)):
        if key not in group.attrs:
            if key == "inputs":
                continue
            raise Damage(f"its attribute {key} is missing")
        raw = group.attrs[key]
        try:
            value = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        except (ValueError, RecursionError):
            raise Damage(f"its attribute {key} is not JSON") from None
        if not isinstance(value, kind):
            wanted = "object" if kind is dict else "text"
            raise Damage(f"its attribute {key} is {shown(value)}, expected a JSON {wanted}")
    model, rec = meta["model"], meta["recording"]
    d, vocab, n_taus = model["d_ffn"], model["vocab_size"], len(rec["taus"])
    recorded, ngram_layers = set(rec["layers"]), set(rec["ngram_layers"])
    tree = _Tree(group, f"analysis/{name}/")

    def values(key: str, lo: int, hi: int, what: str, allowed=None) -> None:
        """The integers of a small index array within [lo, hi) (and among `allowed`)."""
        array = group[key][()].reshape(-1)
        bad = (array < lo) | (array >= hi)
        if allowed is not None:
            bad |= ~np.isin(array, sorted(allowed))
        if bad.any():
            raise Damage(f"analysis/{name}/{key} holds {int(array[bad][0])}, expected {what}")

    def layers(key: str, allowed: set) -> int:
        n = tree.dataset(key, INTEGER, (None,))[0]
        values(key, 0, 1 << 40, "a recorded layer" if allowed is recorded else "an n-gram layer", allowed)
        return n

    def same(keys, kinds: str, shape: tuple) -> None:
        for key in keys:
            tree.dataset(key, kinds, shape)

    if name == "dead":
        n = layers("layers", recorded)
        same(("dead_fraction",), FLOAT, (n, n_taus))
        same(("tau", "dead_primary", "dead_tau0", "dead_sq_share", "alive_freq"), FLOAT, (n,))
    elif name == "ngrams":
        n = layers("layers", ngram_layers)
        analysed = set(group["layers"][()].tolist())
        for order in (1, 2, 3):
            sub = f"n{order}"
            same((f"{sub}/fires", f"{sub}/coverage"), INTEGER, (n, d))
            same((f"{sub}/detector",), BOOL, (n, d))
            tree.dataset(f"{sub}/coverage_hist", INTEGER, (n, None))
            tree.dataset(f"{sub}/ensemble", INTEGER, (n, 4))
            evidence = f"{sub}/trigger_occurrences" in tree  # results stored before the evidence have none
            if evidence:
                same((f"{sub}/trigger_occurrences", f"{sub}/trigger_fires"), INTEGER, (n, d))
            tree.columns(sub, {"covered_layer": INTEGER, "covered_neuron": INTEGER, "covered_gram": INTEGER,
                               "covered_count": INTEGER, **({"covered_occurrences": INTEGER} if evidence else {})})
            values(f"{sub}/covered_layer", 0, 1 << 40, "one of its layers", analysed)
            values(f"{sub}/covered_neuron", 0, d, f"a neuron below d_ffn {d}")
            values(f"{sub}/covered_gram", 0, 1 << 62, "an n-gram key >= 0")
    elif name == "positional":
        n = layers("layers", recorded)
        same(("mi", "mi_plugin", "mi_chance", "mi_null"), FLOAT, (n, d))
        same(("positional", "strong"), BOOL, (n, d))
        tree.dataset("kind", INTEGER, (n, d))
        values("kind", 0, len(schema.POSITIONAL_KINDS) + 1, f"a kind in 0..{len(schema.POSITIONAL_KINDS)}")
        if "too_few" in tree:  # the call limit (results stored before it have none of the four)
            same(("too_few",), BOOL, ())
            same(("n_seqs", "min_seqs"), INTEGER, ())
            same(("chance_mi",), FLOAT, ())
        tree.dataset("ranges", INTEGER, (None, 4))
        ranges = group["ranges"][()]
        if len(ranges) and (not set(ranges[:, 0].tolist()) <= recorded or ranges[:, 1].min() < 0
                            or ranges[:, 1].max() >= d or ranges[:, 2].min() < 0
                            or (ranges[:, 3] <= ranges[:, 2]).any() or ranges[:, 3].max() > meta["data"]["seq_len"]):
            raise Damage(f"analysis/{name}/ranges holds a row outside the recorded layers, neurons or positions")
    elif name == "suppression":
        m = layers("layer", ngram_layers)
        tree.dataset("neuron", INTEGER, (m,))
        values("neuron", 0, d, f"a neuron below d_ffn {d}")
        if "suppresses" in tree and "suppresses_z" not in tree:  # one reading only: stale, analyze recomputes it
            raise Damage("it predates the raw-logit reading (trigger_logit, suppresses_logit)")
        same(("trigger_g", "trigger_logit", "trigger_logit_z", "trigger_rank"), FLOAT, (m,))
        same(("suppresses_logit", "suppresses_z"), BOOL, (m,))
        top = tree.dataset("promoted", INTEGER, (m, None))[1]
        for key in ("promoted", "suppressed"):
            tree.dataset(key, INTEGER, (m, top))
            values(key, 0, vocab, f"a token id below {vocab}")
        same(("promoted_score", "suppressed_score"), FLOAT, (m, top))
    elif name == schema.REPRODUCE:  # engine.explore.reproduce.result: one row per recorded layer
        n = layers("layers", recorded)
        tree.dataset("reproduced", INTEGER, (n, d))
        categories = json.loads(group.attrs["params"]).get("categories")
        tree.dataset("codes", INTEGER, (len(categories) if isinstance(categories, list) else None, n, d))
