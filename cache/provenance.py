"""A typed, read-only view of a recording's provenance (the "meta" attribute that
engine.record.meta.build_meta writes), parsed here and nowhere else. The recorder builds and updates
the dict itself; readers use this view so a renamed or missing key fails in one place.

Keys that older caches lack (spec_given, tau_rule, layer_taus, ngram_bound, parts...) get the default
that the code reading them always assumed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    spec: str                  # absolute for local paths: reloads from any directory
    spec_given: str            # as the user typed it
    name: str
    family: str                # the adapter (engine.model.sites)
    model_type: str
    fingerprint: str
    n_layers: int
    d_model: int
    d_ffn: int
    vocab_size: int
    activation: str
    gated: bool
    dtype: str
    config: dict = field(default_factory=dict, compare=False)
    # where the weights came from when they were not read as stored: a .gguf's {"format": "gguf", "file",
    # "quantization" (e.g. Q4_1), "dequantized_to"}; None for safetensors and for caches recorded before
    weights_from: dict | None = field(default=None, compare=False)

    @property
    def weights_note(self) -> str:
        return weights_note(self.weights_from)

    @property
    def label(self) -> str:
        """The name as every view shows it: with a dequantized GGUF's quantization, when known."""
        note = self.weights_note
        return f"{self.name}, {note}" if note else self.name


def weights_note(weights_from, short: bool = False) -> str:
    """"Q4_1 GGUF, dequantized to float32" ("Q4_1 GGUF" short) from meta model.weights_from; "" when there is
    none (or not one a recording writes: a crafted file's meta is only checked for what the readers need)."""
    if not isinstance(weights_from, dict) or weights_from.get("format") != "gguf":
        return ""
    quant, dtype = weights_from.get("quantization"), weights_from.get("dequantized_to")
    note = f"{quant} GGUF" if isinstance(quant, str) and quant else "GGUF"
    return note + (f", dequantized to {dtype}" if isinstance(dtype, str) and dtype and not short else "")


@dataclass(frozen=True)
class TokenizerInfo:
    name: str
    size: int
    start_id: int | None
    sep_id: int | None


@dataclass(frozen=True)
class DataInfo:
    sources: tuple[dict, ...]
    field: str | None
    seed: int
    fingerprint: str
    seq_len: int
    n_seqs_total: int
    tokens_total: int
    domain_names: tuple[str, ...]
    n_documents: int | None
    notes: tuple[str, ...]


@dataclass(frozen=True)
class RecordingInfo:
    taus: tuple[float, ...]
    primary_tau: float | None        # None for a relative rule (each layer has its own tau_l)
    primary_index: int               # the fire_count row of the firing rule
    tau_rule: str                    # "absolute", "quantile:Q" or "median-max:F"
    layer_taus: dict[int, float | None]
    firing_rule: str
    layers: tuple[int, ...]
    ngram_layers: tuple[int, ...]
    ngram_max_freq: str | float      # "auto" or the user's cap
    ngram_bound: dict | None         # set by the recorder when there are n-gram layers
    calib_tokens: int | None
    topk: int
    samples: int
    sample_rate: float
    n_seqs_total: int
    part: tuple[int, int]
    parts: tuple[tuple[int, int], ...] | None   # the merged parts, for a merged cache
    seq_range: tuple[int, int]
    part_tokens: int
    shard_tokens: int
    n_shards: int
    batch_tokens: int | None
    tokens_per_s: float | None       # the recording job's measured speed over its layers (None before v0.1 caches had it)

    @property
    def is_relative(self) -> bool:
        return self.tau_rule != "absolute"

    def layer_tau(self, layer: int) -> float:
        """The threshold the firing rule uses in this layer (the same in every layer for an absolute rule)."""
        value = self.layer_taus.get(layer)
        return float(self.primary_tau if value is None else value)

    @property
    def tau0_index(self) -> int:
        """The fire_count row of tau = 0, the paper's "activated" (always recorded)."""
        return self.taus.index(0.0)


@dataclass(frozen=True)
class Provenance:
    tool_version: str
    schema_version: int
    created: str
    model: ModelInfo
    tokenizer: TokenizerInfo
    data: DataInfo
    recording: RecordingInfo

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Provenance":
        """KeyError for a meta dict without a key every cache has (not one of ours, or broken)."""
        m, t, d, r = meta["model"], meta["tokenizer"], meta["data"], meta["recording"]
        model = ModelInfo(
            spec=m["spec"], spec_given=m.get("spec_given") or m["spec"], name=m["name"], family=m["family"],
            model_type=m.get("model_type", ""), fingerprint=m["fingerprint"], n_layers=int(m["n_layers"]),
            d_model=int(m["d_model"]), d_ffn=int(m["d_ffn"]), vocab_size=int(m["vocab_size"]),
            activation=m["activation"], gated=bool(m.get("gated")), dtype=m["dtype"], config=dict(m.get("config", {})),
            weights_from=m.get("weights_from"))
        tokenizer = TokenizerInfo(name=t.get("name", ""), size=t.get("size", 0), start_id=t.get("start_id"),
                                  sep_id=t.get("sep_id"))
        data = DataInfo(
            sources=tuple(d["sources"]), field=d.get("field"), seed=d.get("seed", 0), fingerprint=d["fingerprint"],
            seq_len=int(d["seq_len"]), n_seqs_total=d.get("n_seqs_total", 0), tokens_total=d.get("tokens_total", 0),
            domain_names=tuple(d.get("domain_names", ())), n_documents=d.get("n_documents"),
            notes=tuple(d.get("notes", ())))
        primary = r.get("primary_tau")
        recording = RecordingInfo(
            taus=tuple(float(x) for x in r["taus"]), primary_tau=None if primary is None else float(primary),
            primary_index=int(r["primary_index"]), tau_rule=r.get("tau_rule", "absolute"),
            layer_taus={int(k): v for k, v in (r.get("layer_taus") or {}).items()},
            firing_rule=r.get("firing_rule", ""), layers=tuple(r["layers"]), ngram_layers=tuple(r["ngram_layers"]),
            ngram_max_freq=r.get("ngram_max_freq", "auto"), ngram_bound=r.get("ngram_bound"),
            calib_tokens=r.get("calib_tokens"), topk=r.get("topk", 0), samples=r.get("samples", 0),
            sample_rate=r.get("sample_rate", 0.0), n_seqs_total=r.get("n_seqs_total", 0),
            part=tuple(r.get("part", (1, 1))), parts=None if r.get("parts") is None else
            tuple(tuple(p) for p in r["parts"]), seq_range=tuple(r.get("seq_range", (0, 0))),
            part_tokens=r.get("part_tokens", 0), shard_tokens=r.get("shard_tokens", 0), n_shards=r["n_shards"],
            batch_tokens=r.get("batch_tokens"), tokens_per_s=r.get("tokens_per_s"))
        return cls(tool_version=meta.get("tool_version", "?"), schema_version=meta.get("schema_version", 0),
                   created=meta.get("created", ""), model=model, tokenizer=tokenizer, data=data, recording=recording)
