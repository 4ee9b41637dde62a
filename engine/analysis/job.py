"""`analyze`: compute the paper's analyses on a recording, store them in the cache, and recompute
only what is missing or stale (other parameters, another recording state, changed inputs)."""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from ffnscope.cache.schema import ANALYSES
from ffnscope.cache import analysis_store as store
from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import check_fingerprint
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.dead import firing_by_layer
from ffnscope.engine.analysis.ngrams import NgramParams, coverage_histogram, ensemble, ngram_layer, unigram_counts
from ffnscope.engine.analysis.positional import KINDS, CallLimit, PositionalParams, call_limit, positional_layer
from ffnscope.engine.analysis.suppression import SuppressionParams, suppression_layer, trigger_g

DEAD_COLUMNS = 2  # version of the dead analysis' stored columns
NGRAM_COLUMNS = 2  # version of the ngrams analysis' stored arrays (2: every detector verdict's evidence)
PARAMS = {"ngrams": NgramParams, "positional": PositionalParams, "suppression": SuppressionParams}
# one row per token detector (engine.analysis.suppression.SuppressionResult), plus "layer"
SUPPRESSION_KEYS = ("neuron", "promoted", "promoted_score", "suppressed", "suppressed_score", "trigger_g",
                    "trigger_logit", "trigger_logit_z", "trigger_rank", "suppresses_logit", "suppresses_z")


def parse_settings(pairs: list[str]) -> dict[str, dict]:
    """["ngrams.min_occurrences=3", "mi_threshold=0.1"] -> {"ngrams": {...}, "positional": {...}}.
    An unqualified key must belong to exactly one analysis."""
    out: dict[str, dict] = {name: {} for name in PARAMS}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--set '{pair}' is not key=value; for example --set ngrams.min_occurrences=3")
        name, _, field_name = key.rpartition(".")
        owners = [name] if name else [n for n, p in PARAMS.items() if field_name in _field_types(p)]
        if len(owners) != 1 or owners[0] not in PARAMS or field_name not in _field_types(PARAMS[owners[0]]):
            known = ", ".join(f"{n}.{f}" for n, p in PARAMS.items() for f in _field_types(p))
            raise UserError(f"--set: unknown parameter '{key}'; known: {known}")
        kind = _field_types(PARAMS[owners[0]])[field_name]
        try:
            out[owners[0]][field_name] = int(value) if kind is int else float(value)
        except ValueError:
            raise UserError(f"--set {key}: '{value}' is not {'a whole number' if kind is int else 'a number'}") from None
        number = out[owners[0]][field_name]
        # every parameter is a count (at least 1) or a share/threshold between 0 and 1
        if kind is int and number < 1:
            raise UserError(f"--set {key}: {value} must be at least 1")
        if kind is int and number >= 2**31:  # a count of tokens, n-grams or positions: never that many
            raise UserError(f"--set {key}: {value} is above {2**31 - 1:,}, the most any of these counts takes")
        if kind is not int and not 0 <= number <= 1:  # also refuses nan and inf
            raise UserError(f"--set {key}: {value} must lie between 0 and 1")
    return out


def _field_types(cls) -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(cls)}


class Analyzer:
    def __init__(self, reader: CacheReader, settings: dict[str, dict], log=print):
        self.reader = reader
        self.prov = reader.provenance
        self.log = log
        self.params = {name: replace(cls(), **settings.get(name, {})) for name, cls in PARAMS.items()}
        self.ngram_layers: list[int] = list(self.prov.recording.ngram_layers)
        self.fresh: dict[str, store.Result] = {}
        self.allow_pickle = False  # suppression loads the model: accept pickle weights
        self.model = None  # the recorded model, already loaded in float32 (analyze's `model`): not loaded again

    def inputs(self, name: str) -> dict:
        """Results an analysis builds on: changing them makes it stale."""
        return {"ngrams": self.params["ngrams"].as_dict()} if name == "suppression" else {}

    def params_of(self, name: str) -> dict:
        if name == "dead":
            return {"columns": DEAD_COLUMNS}  # results of older versions (fewer columns) are stale
        if name == "ngrams":  # results stored before the detectors' evidence are stale
            return {**self.params[name].as_dict(), "columns": NGRAM_COLUMNS}
        return self.params[name].as_dict() if name in self.params else {}

    def run(self, only: list[str] | None) -> dict[str, str]:
        wanted = list(ANALYSES) if not only else [n for n in ANALYSES if n in only]
        status = {}
        for name in wanted:
            if store.is_current(self.reader, name, self.params_of(name), self.inputs(name)) and \
                    not any(dep in self.fresh for dep in self.inputs(name)):
                status[name] = "current"
                continue
            self.log(f"analyzing: {name}")
            self.fresh[name] = getattr(self, f"_{name}")()
            status[name] = "computed"
        return status

    # --- the analyses -------------------------------------------------------------------------
    def _dead(self) -> store.Result:
        result = store.Result("dead", self.params_of("dead"))
        rows = firing_by_layer(self.reader)
        taus = self.prov.recording.taus
        result.put("layers", [r.layer for r in rows])
        result.put("dead_fraction", [[r.dead(t) for t in taus] for r in rows])  # per absolute tau
        result.put("tau", [r.tau for r in rows])                    # the layer's primary threshold
        result.put("dead_primary", [r.dead_primary for r in rows])  # never above it
        result.put("dead_tau0", [r.dead_tau0 for r in rows])        # never activated (the paper's dead)
        result.put("dead_sq_share", [r.dead_sq_share for r in rows])
        result.put("alive_freq", [r.alive_freq for r in rows])
        return result

    def _ngrams(self) -> store.Result:
        params = self.params["ngrams"]
        result = store.Result("ngrams", self.params_of("ngrams"))
        result.put("layers", np.array(self.ngram_layers, np.int64))
        data = self.reader.gram_counts()
        data[1] = unigram_counts(self.reader.unigram())
        for n in (1, 2, 3):
            per_layer = []
            for layer in self.ngram_layers:
                sparse, counted = self.reader.ngrams(layer, n)
                per_layer.append(ngram_layer(sparse, data[n], counted, n, params))
            put_ngram_order(result, n, self.ngram_layers, per_layer, self.prov.model.d_ffn)
        return result

    def _positional(self) -> store.Result:
        params = self.params["positional"]
        result = store.Result("positional", params.as_dict())
        seq_len = self.prov.data.seq_len
        n_seqs = self.reader.n_tokens // seq_len
        layers = self.reader.layers
        columns: dict[str, list[np.ndarray]] = {key: [] for key in POSITIONAL_COLUMNS}
        ranges = []
        for layer in layers:
            r = positional_layer(self.reader.array(layer, "pos_fire"), n_seqs, params)
            for key in POSITIONAL_COLUMNS:
                columns[key].append(getattr(r, key))
            columns["kind"][-1] = np.array([KINDS.index(k) + 1 if k else 0 for k in r.kind], np.uint8)
            ranges += [(layer, neuron, a, b) for neuron, spans in sorted(r.ranges.items()) for a, b in spans]
        put_positional(result, layers, columns, ranges, call_limit(n_seqs, seq_len, params))
        return result

    def _suppression(self) -> store.Result:
        params = self.params["suppression"]
        result = store.Result("suppression", params.as_dict(), self.inputs("suppression"))
        ngrams = self.fresh["ngrams"].arrays if "ngrams" in self.fresh else store.read_group(self.reader, "ngrams")
        lm = self._load_model()
        adapter = lm.adapter
        norm = adapter.final_norm_scale()
        norm = None if norm is None else norm.detach().float().cpu().numpy()
        # float64 once: the projection is float64, and numpy would cast a float32 one in every product
        unembedding = adapter.unembedding().detach().float().cpu().numpy().astype(np.float64)
        keys = SUPPRESSION_KEYS
        parts: dict[str, list] = {k: [] for k in keys + ("layer",)}
        for row, layer in enumerate(ngrams["layers"]):
            neurons = np.flatnonzero(ngrams["n1/detector"][row])
            mine = ngrams["n1/covered_layer"] == layer
            triggers = [ngrams["n1/covered_gram"][mine & (ngrams["n1/covered_neuron"] == i)] for i in neurons]
            if len(neurons):
                rows = adapter.w_out(int(layer)).detach().float().cpu().numpy()[neurons]
                # the update's direction: the sign of g at the triggers' firings (not of g's mean over all tokens)
                g_at = trigger_g(self.reader.ngrams(int(layer), 1)[0], neurons, triggers, self.prov.model.d_ffn)
            else:  # no detector: nothing to read (its empty chunk keeps the stored types when no layer has one)
                rows, g_at = np.zeros((0, unembedding.shape[1]), np.float32), np.zeros(0, np.float32)
            r = suppression_layer(neurons, triggers, rows, g_at, norm, unembedding, params)
            for k in keys:
                parts[k].append(getattr(r, k))
            parts["layer"].append(np.full(len(neurons), layer, np.int64))
        put_suppression_rows(result, parts, params.top)
        return result

    def _load_model(self):
        from ffnscope.engine.model.load import load_model

        model = self.prov.model
        if self.model is not None:
            lm = self.model
        else:
            try:
                lm = load_model(model.spec, "float32", allow_pickle=self.allow_pickle)
            except UserError as exc:
                raise UserError(f"suppression needs the recorded model '{model.spec}': {exc}; "
                                "or skip it with --only dead ngrams positional") from None
        check_fingerprint(model.fingerprint, lm.fingerprint, f"the cache {self.reader.path}",
                          f"'{model.spec}' is not the model this cache was recorded with (fingerprint "
                          f"{lm.fingerprint} vs {model.fingerprint}); give the original model",
                          ", or skip suppression with --only dead ngrams positional")
        return lm


POSITIONAL_COLUMNS = ("mi", "mi_plugin", "mi_chance", "mi_null", "positional", "kind", "strong")
POSITIONAL_LIMIT = ("too_few", "n_seqs", "min_seqs", "chance_mi")  # the call limit's scalars (stored_note)


def put_positional(result: store.Result, layers: list[int], columns: dict[str, list[np.ndarray]], ranges: list,
                   limit: CallLimit) -> None:
    """Store the positional analysis: per-layer (L, d_ffn) columns (kind as uint8, 0 = not positional),
    the strong indicators' ranges (layer, neuron, start, end) and whether there were enough sequences
    per position to call any positional neuron (engine.analysis.positional.call_limit)."""
    result.put("layers", np.array(layers, np.int64))
    for key in POSITIONAL_COLUMNS:
        result.put(key, np.stack(columns[key]))
    result.put("ranges", np.array(ranges, np.int64).reshape(-1, 4))
    result.put("n_seqs", np.int64(limit.n_seqs))
    result.put("min_seqs", np.int64(limit.min_seqs))
    result.put("chance_mi", np.float64(limit.chance_mi))
    result.put("too_few", np.bool_(limit.too_few))


def put_ngram_order(result: store.Result, n: int, layers: list[int], per_layer: list, d_ffn: int) -> None:
    """Store one n-gram order's per-layer results (engine.analysis.ngrams.ngram_layer) under n{n}/."""
    for key in ("fires", "coverage", "detector", "trigger_occurrences", "trigger_fires"):
        result.put(f"n{n}/{key}", np.stack([getattr(r, key) for r in per_layer]) if per_layer
                   else np.zeros((0, d_ffn)))
    covered_layer = np.concatenate([np.full(len(r.covered_neuron), layer) for layer, r
                                    in zip(layers, per_layer)]) if per_layer else []
    result.put(f"n{n}/covered_layer", np.asarray(covered_layer, np.int64))
    for key in ("covered_neuron", "covered_gram", "covered_count", "covered_occurrences"):
        result.put(f"n{n}/{key}", np.concatenate([getattr(r, key) for r in per_layer]) if per_layer
                   else np.zeros(0, np.int64))
    result.put(f"n{n}/coverage_hist", [coverage_histogram(r.coverage) for r in per_layer])
    detected = [set(np.unique(r.covered_gram).tolist()) for r in per_layer]
    result.put(f"n{n}/ensemble", [[row[k] for k in ("detected", "new_overall", "new_vs_previous", "cumulative")]
                                  for row in ensemble(detected)])


def put_suppression_rows(result: store.Result, parts: dict[str, list], top: int) -> None:
    """Store the per-layer suppression chunks, one row per token detector."""
    for key, chunks in parts.items():
        empty = np.zeros((0, top) if key in ("promoted", "promoted_score", "suppressed", "suppressed_score") else 0)
        result.put(key, np.concatenate(chunks) if chunks else empty)


def _float32(lm) -> bool:
    """Whether a loaded model's weights are float32 (a recording's --dtype may have been another)."""
    import torch

    return lm.model.dtype == torch.float32


def analyze(path: Path, only: list[str] | None = None, settings: list[str] | None = None, log=print,
            allow_pickle: bool = False, model=None) -> dict[str, str]:
    """`model`: the recorded model as engine.model.load.load_model gave it, when the caller holds it (a
    recording that goes on to its analyses): suppression uses it instead of loading it again (seconds), if
    its weights are float32, as suppression loads them; its fingerprint is checked against the cache's."""
    unknown = set(only or ()) - set(ANALYSES)
    if unknown:
        raise UserError(f"--only: unknown analysis {', '.join(sorted(unknown))}; choose from {', '.join(ANALYSES)}")
    parsed = parse_settings(settings or [])
    with CacheReader(path, "analyzing it") as reader:
        if reader.status != "complete":
            raise UserError(f"{path} is a partial recording; finish it with `ffnscope record ... --resume` first")
        analyzer = Analyzer(reader, parsed, log)
        analyzer.allow_pickle = allow_pickle
        analyzer.model = model if model is not None and _float32(model) else None
        status = analyzer.run(only)
        fresh, recording = list(analyzer.fresh.values()), store.recording_key(reader)
    store.write_results(path, fresh, recording)
    return status
