"""Provenance of a recording, and the checks that two caches describe the same recording."""
from __future__ import annotations

import math
import time

from ffnscope.cache.errors import UserError
from ffnscope.cache.schema import SCHEMA_VERSION
from ffnscope import __version__


EXTRA_TAUS = (0.0, 0.5, 1.0, 2.0)  # thresholds always recorded besides the primary one


def part_range(n_seqs: int, part: tuple[int, int]) -> tuple[int, int]:
    i, n = part
    return (i - 1) * n_seqs // n, i * n_seqs // n


def parse_ranges(text: str, option: str, what: str = "a layer list", example: str = "0-5,8") -> list[tuple[int, int]]:
    """'0-5,8' -> [(0, 5), (8, 8)]: the syntax only, kept as intervals so that '0-99999999999999999999'
    costs nothing (never a set of its members); check_ranges bounds them once the range is known."""
    ranges = []
    try:
        pieces = [p.strip() for p in str(text).split(",")]
        if not all(pieces):
            raise ValueError
        for piece in pieces:
            lo, _, hi = piece.partition("-")
            lo, hi = int(lo), int(hi or lo)  # int() refuses signs inside ('1--2') and over 4300 digits
            if lo < 0 or hi < lo:
                raise ValueError
            ranges.append((lo, hi))
    except ValueError:
        raise UserError(f"{option} '{text}' is not {what}; write it like {example}") from None
    return ranges


def check_ranges(ranges: list[tuple[int, int]], first: int, last: int, option: str, text: str,
                 item: str = "layer", whose: str = "the model's layers") -> list[int]:
    """The members of `ranges` (sorted, unique), all within first..last; else one line naming the range."""
    low, high = min(lo for lo, _ in ranges), max(hi for _, hi in ranges)
    if low < first or high > last:
        bad = high if high > last else low
        raise UserError(f"{option} '{text}' names {item} {bad}, outside {first}-{last} ({whose}); give {item}s "
                        f"within {first}-{last}, like {first}-{last}")
    return sorted({i for lo, hi in ranges for i in range(lo, hi + 1)})  # at most last - first + 1 of them


def parse_layers(text: str | None, n_layers: int, option: str) -> list[int] | None:
    """'0-5,8,10-11' -> sorted unique layer indices, checked against the model's n_layers."""
    if text is None:
        return None
    return check_ranges(parse_ranges(text, option), 0, n_layers - 1, option, text)


TAU_RULES = ("absolute", "quantile:Q", "median-max:F")
MAX_MEDIAN_MAX = 1000.0  # F x the median neuron's largest act: far beyond it no neuron of a layer fires


def parse_tau_rule(text: str | None) -> tuple[str, float | None]:
    """'absolute' -> ("absolute", None); 'quantile:0.99' -> ("quantile", 0.99) (tau_l = that quantile of
    act over the layer's neurons and the calibration tokens, 0 < Q < 1); 'median-max:0.25' ->
    ("median-max", 0.25) (tau_l = F x the median over the layer's neurons of each one's largest act on
    the calibration tokens, 0 < F <= MAX_MEDIAN_MAX)."""
    text = (text or "absolute").strip()
    if text == "absolute":
        return "absolute", None
    kind, _, value = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = math.nan  # refused below: every comparison with nan is false
    if kind == "quantile" and 0 < number < 1:
        return kind, number
    if kind == "median-max" and 0 < number <= MAX_MEDIAN_MAX:  # finite: inf would make every neuron dead
        return kind, number
    raise UserError(f"--tau-rule '{text}' is not one of absolute, quantile:Q (0 < Q < 1, like quantile:0.99) "
                    f"or median-max:F (0 < F <= {MAX_MEDIAN_MAX:g}, like median-max:0.25)")


def relative_rule_text(adapter, rule: str) -> str:
    """The firing rule in words for a relative rule: the adapter's own text with tau_l for tau."""
    from ffnscope.engine.analysis.dead import describe_rule

    head = adapter.firing_rule(0.0).rsplit(" > ", 1)[0]
    return f"{head} > tau_l per layer ({describe_rule(rule)})"


def layer_taus(rec: dict, index: int) -> list[float]:
    """The thresholds of layer `index`'s fire_count rows (`rec`: the meta's recording dict): the absolute ones,
    and for a relative rule the layer's own tau_l as the last (primary) row."""
    if rec["primary_index"] < len(rec["taus"]):
        return list(rec["taus"])
    return [*rec["taus"], float(rec["layer_taus"][str(index)])]


def build_meta(config, lm, sources, packed, seq_len: int, start_id, sep_id) -> dict:
    from ffnscope.engine.record.config import default_calib_tokens

    adapter = lm.adapter
    n_layers = len(adapter.layers)
    kind, value = parse_tau_rule(getattr(config, "tau_rule", None))
    relative = kind != "absolute"
    if relative and config.tau is not None:
        raise UserError("--tau sets an absolute threshold; leave it out with a relative --tau-rule "
                        "(fire counts at 0, 0.5, 1 and 2 are recorded beside the relative rule anyway)")
    primary = config.tau if config.tau is not None else (0.0 if adapter.is_relu else 1.0)
    # absolute: one row per threshold, the primary among them; relative: the absolute rows, then one
    # more row (the last) at each layer's own tau_l, known after calibration (meta.layer_taus)
    taus = sorted(set(EXTRA_TAUS) | ({float(primary)} if not relative else set()))
    rule = "absolute" if not relative else f"{kind}:{value:g}"
    layers = parse_layers(config.layers, n_layers, "--layers") or list(range(n_layers))
    ngram = parse_layers(config.ngram_layers, n_layers, "--ngram-layers")
    if ngram is None:
        ngram = [i for i in layers if i < n_layers // 2]
    elif not set(ngram) <= set(layers):
        raise UserError("--ngram-layers must be among the recorded --layers")
    n_seqs = len(packed.tokens)
    lo, hi = part_range(n_seqs, config.part)
    per_shard = max(1, config.shard_tokens // seq_len)
    model_config = lm.config.to_dict()
    model_config.pop("quantization_config", None)
    return {
        "tool_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            # spec: absolute for local paths, so the model reloads from any directory; spec_given: as typed
            "spec": lm.spec, "spec_given": lm.given or lm.spec, "name": lm.name, "family": adapter.name,
            "model_type": lm.config.model_type, "fingerprint": lm.fingerprint,
            "n_layers": n_layers, "d_model": int(lm.config.hidden_size) if hasattr(lm.config, "hidden_size")
            else int(lm.model.get_input_embeddings().weight.shape[1]),
            "d_ffn": adapter.d_ffn, "vocab_size": int(lm.model.get_input_embeddings().weight.shape[0]),
            "activation": adapter.activation_name, "gated": adapter.gated, "dtype": config.dtype,
            "config": {k: v for k, v in model_config.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
            # a dequantized .gguf's file and quantization (load.gguf_origin); not part of the fingerprint
            **({"weights_from": lm.weights_from} if lm.weights_from else {}),
        },
        "tokenizer": {"name": getattr(lm.tokenizer, "name_or_path", ""), "size": len(lm.tokenizer),
                      "start_id": start_id, "sep_id": sep_id},
        "data": {
            "sources": sources.describe(), "field": config.field, "seed": config.seed,
            "fingerprint": packed.fingerprint(), "seq_len": seq_len, "n_seqs_total": n_seqs,
            "tokens_total": int(packed.tokens.size), "domain_names": packed.domain_names,
            "n_documents": packed.n_documents, "notes": list(sources.notes),
        },
        "recording": {
            "taus": taus, "primary_tau": None if relative else float(primary),
            "primary_index": len(taus) if relative else taus.index(float(primary)), "tau_rule": rule,
            "layer_taus": {str(i): None if relative else float(primary) for i in layers},
            "firing_rule": relative_rule_text(adapter, rule) if relative else adapter.firing_rule(primary),
            "layers": layers, "ngram_layers": ngram,
            # "auto": n-gram counts for every neuron that can still be a detector (ngram_bound, set by
            # engine.record.job); a number F: for the neurons firing at most F (the user's cap replaces it)
            "ngram_max_freq": "auto" if config.ngram_max_freq is None else float(config.ngram_max_freq),
            "calib_tokens": (default_calib_tokens(int(packed.tokens.size), seq_len) if config.calib_tokens is None
                             else config.calib_tokens),
            "topk": config.topk, "samples": config.samples,
            "sample_rate": min(1.0, config.samples / packed.tokens.size),
            "n_seqs_total": n_seqs, "part": list(config.part), "seq_range": [lo, hi],
            "part_tokens": (hi - lo) * seq_len, "shard_tokens": config.shard_tokens,
            "n_shards": -(-(hi - lo) // per_shard), "batch_tokens": config.batch_tokens,
        },
    }
