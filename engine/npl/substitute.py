"""Substitution perplexity (NPL paper Sec. 4, Table 1) and finer-grained substitution (Fig. 4).

In a substituted layer j the FFN activation g_j is replaced, inside the same forward pass, by a
prediction from g_{j-1}: the activation layer j-1 computes in that pass (from its possibly
perturbed input, before its own replacement), so predictions are never chained through other
predictions. Mappings:
- npl:       g_{j-1} @ W + b with the fitted M_{j-1->j};
- random:    g_{j-1} @ R with R Gaussian, entries of standard deviation equal to that of the fitted
             map's W (1/sqrt(d_ffn) when no map is at hand, or with random_scale="unit"), drawn from
             (seed, j); several seeds, perplexities averaged;
- zero:      0;
- identical: g_{j-1}.
Layer 0 has no previous layer: it keeps its actual activation (chunk 1 substitutes layers 1..).

Complete substitution: the replaced FFN output feeds the later layers and the final hidden state.
Partial substitution: the later layers see the replaced output, but the final hidden state (before
the final norm) gets the explicit contribution of the computed activations back:
h_final = h_final(substituted) - sum_j FFN_j(replacement_j) + sum_j FFN_j(computed g_j).
Both come from one forward: they differ only in the final hidden state.
Explicit-only (optional, `explicit=True`): the later layers see the actual outputs and only the final
hidden state gets the replaced ones, h_final = h_final(unmodified) - sum_j FFN_j(g_j) + sum_j
FFN_j(replacement_j), predictions made from the unmodified pass; computed on the unmodified pass at
the cost of the mappings and one LM head per setting. The paper's Table 1 "Partial" numbers (chunk 1
near the original perplexity for every mapping, chunk 4 worst) behave like this mode, while its
Fig. 3 caption and DESIGN.md define partial as above; we report both and leave the name to DESIGN.md.

Perplexity is exp of the token-weighted mean loss over all next-token predictions of the held-out
sequences. Settings run chunk by chunk (grouped by their first layer), each chunk over every batch,
holding only that chunk's maps: per batch, the layers before the chunk run once (for the first chunk
the whole unmodified pass, which also gives the model's own perplexity) and their hidden states are
reused by every setting of the chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import check_fingerprint
from ffnscope.engine.jobs.stop import StopToken
from ffnscope.engine.model.batches import seq_batches
from ffnscope.engine.npl.capture import (GCapture, PassProgress, as_ids, make_runner, output_difference, run_layers,
                                          token_nll)
from ffnscope.engine.npl.layout import chunks as make_chunks
from ffnscope.engine.npl.layout import substituted
from ffnscope.engine.npl.timing import DeviceTimer

from ffnscope.engine.npl.report import MAPPINGS
TREATMENTS = ("actual", "predicted", "zero", "random")
RANK_METRICS = ("pearson", "l2", "mean", "variance")
# (top half, bottom half) pairs of the Fig. 4 grid, besides 100% actual and 100% predicted
FINE_GRID = (("actual", "predicted"), ("predicted", "actual"), ("zero", "predicted"), ("predicted", "zero"),
             ("zero", "actual"), ("actual", "zero"), ("random", "actual"), ("actual", "random"))

# mapping(j, g_prev, g_computed) -> replacement of g_j
Mapping = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class Maps:
    """The fitted maps M_{j-1->j} (and metrics) a substitution run uses, keyed by target layer.

    Built from a sidecar (`from_reader`), a map's W and b are read only when a run holds the group of
    layers that needs it (`hold`): a run holds one chunk's maps at a time, not every chunk's (at d_ffn
    11,008, LLaMA-2-7b, a map is 485 MB of float32). Maps given whole (`weights`) are simply all held."""

    def __init__(self, fingerprint: str, d: int, weights: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                 metrics: dict[int, dict[str, np.ndarray]] | None = None,
                 load: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None, layers=None):
        self.fingerprint = fingerprint
        self.d = d
        self.weights = weights or {}  # the maps held now
        self.metrics = metrics or {}
        self.layers = sorted(set(self.weights) if layers is None else set(layers))  # the maps there are
        self._load = load  # j -> (W, b), read when held; None: every map is in `weights`
        self._std: dict[int, float] = {}
        self._device: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_reader(cls, reader, layers, method: str = "exact", need_metrics: bool = False) -> "Maps":
        """M_{j-1->j} for each j in layers in a cache.npl_store.NplReader (which must stay open while they are
        used): the metrics read now (d_ffn values a map), W and b when held."""
        layers = sorted(set(layers))
        metrics = {j: reader.metrics(j - 1, j, method) for j in layers} if need_metrics else {}
        d = int(reader.meta["model"]["d_ffn"])
        return cls(reader.meta["model"]["fingerprint"], d, metrics=metrics, layers=layers,
                   load=lambda j: reader.load_map(j - 1, j, method))

    def check_model(self, lm) -> None:
        check_fingerprint(self.fingerprint, lm.fingerprint, "these NPL maps",
                          f"these NPL maps were fit on another model (fingerprint {self.fingerprint}) than "
                          f"{lm.name} (fingerprint {lm.fingerprint}); use the model they were fit on, or fit "
                          "maps on a cache of this model")

    def require(self, layers) -> None:
        missing = [j for j in layers if j not in self.layers]
        if missing:
            raise UserError(f"substitution needs the maps M_(j-1)->j for layers {_ranges(missing)}; fit them "
                            "with `ffnscope npl fit CACHE --pairs adjacent --force`")

    def hold(self, layers) -> None:
        """Hold the maps into `layers` (those there are), and only them when they can be read again."""
        wanted = set(layers) & set(self.layers)
        if self._load is not None:
            for j in set(self.weights) - wanted:
                del self.weights[j]
            self._device = {key: v for key, v in self._device.items() if key[0] in wanted}
        for j in sorted(wanted - set(self.weights)):
            self.weights[j] = self._load(j)

    def held_bytes(self, layers) -> int:
        """Bytes the maps into `layers` take held, one copy of W and b as float32: in host memory, and
        once more on a GPU (`on`)."""
        return sum(4 * (self.d * self.d + self.d) for j in set(layers) if j in self.layers)

    def on(self, j: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (j, str(device))
        if key not in self._device:
            w, b = self.weights[j]
            self._device[key] = (torch.as_tensor(np.asarray(w), dtype=torch.float32, device=device),
                                 torch.as_tensor(np.asarray(b), dtype=torch.float32, device=device))
        return self._device[key]

    def random_std(self, j: int, scale: str) -> float:
        if scale == "npl" and j in self.layers:
            if j not in self._std:  # asked while j's group is held, as the random mapping is
                self._std[j] = float(np.asarray(self.weights[j][0], np.float64).std())
            return self._std[j]
        return 1.0 / math.sqrt(self.d)


def _ranges(layers) -> str:
    return ",".join(str(j) for j in layers)


def random_matrix(seed: int, j: int, d: int, std: float, device) -> torch.Tensor:
    """R for (seed, j), drawn where it is used: a mapping calls this per batch, and d^2 draws on the host
    then copied up (121M at LLaMA-2-7b: 2.2 s on one core here) would cost a GPU more than its forward. A GPU's
    generator is not the CPU's: the same seed gives other entries there, each reproducible."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(1_000_003 * int(seed) + int(j))
    return torch.randn(d, d, generator=gen, device=device) * std


def mapping_fn(kind: str, maps: Maps | None = None, seed: int = 0, random_scale: str = "npl") -> Mapping:
    if kind == "zero":
        return lambda j, prev, g: torch.zeros_like(g)
    if kind == "identical":
        return lambda j, prev, g: prev
    if kind == "npl":
        def npl(j, prev, g):
            w, b = maps.on(j, g.device)
            return prev.float() @ w + b
        return npl
    if kind == "random":
        def rand(j, prev, g):
            d = g.shape[-1]
            std = maps.random_std(j, random_scale) if maps is not None else 1.0 / math.sqrt(d)
            return prev.float() @ random_matrix(seed, j, d, std, g.device)
        return rand
    if kind == "actual":
        return lambda j, prev, g: g
    raise UserError(f"unknown mapping '{kind}'; use one of {', '.join(MAPPINGS)}")


def treatment_fn(kind: str, maps: Maps | None, seed: int, random_scale: str) -> Mapping:
    return mapping_fn({"predicted": "npl"}.get(kind, kind), maps, seed, random_scale)


def halves(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the top half of neurons by `values` (NaN ranks lowest; ties by index)."""
    v = np.where(np.isfinite(values), values, -np.inf)
    order = np.argsort(-v, kind="stable")
    mask = np.zeros(len(v), bool)
    mask[order[: len(v) // 2]] = True
    return mask


def rank_values(metrics: dict[str, np.ndarray], metric: str) -> np.ndarray:
    key = {"pearson": "pearson", "l2": "l2", "mean": "target_mean", "variance": "target_var"}.get(metric)
    if key is None:
        raise UserError(f"unknown ranking metric '{metric}'; use one of {', '.join(RANK_METRICS)}")
    return np.asarray(metrics[key], np.float64)


def split_fn(masks: dict[int, np.ndarray], top: Mapping, bottom: Mapping) -> Mapping:
    cache: dict[tuple[int, str], torch.Tensor] = {}

    def split(j, prev, g):
        key = (j, str(g.device))
        if key not in cache:
            cache[key] = torch.as_tensor(masks[j], device=g.device)
        return torch.where(cache[key], top(j, prev, g).to(g.dtype), bottom(j, prev, g).to(g.dtype))
    return split


@dataclass
class Setting:
    """One substitution: which layers, and what replaces their activations."""
    layers: list[int]
    mapping: Mapping
    labels: dict = field(default_factory=dict)


@dataclass
class Outcome:
    labels: dict
    layers: list[int]
    nll_complete: float = 0.0
    nll_partial: float = 0.0
    nll_explicit: float | None = None
    tokens: int = 0
    seconds: float = 0.0

    def ppl(self, mode: str) -> float:
        nll = {"complete": self.nll_complete, "partial": self.nll_partial, "explicit": self.nll_explicit}[mode]
        return float("nan") if nll is None else _ppl(nll, self.tokens)


def _ppl(nll: float, tokens: int) -> float:
    if tokens == 0:
        return float("nan")
    mean = nll / tokens
    return math.exp(mean) if mean < 700 else float("inf")


@dataclass
class RunResult:
    original_nll: float
    tokens: int
    outcomes: list[Outcome]
    seconds: dict[str, float]

    @property
    def original_ppl(self) -> float:
        return _ppl(self.original_nll, self.tokens)


SECONDS = ("original", "substituted", "explicit", "repeated")  # RunResult.seconds' buckets


def run_settings(lm, tokens: np.ndarray, settings: list[Setting], device="cpu", batch_tokens: int = 8192,
                 on_progress=None, stop: StopToken | None = None, explicit: bool = False, limits=None,
                 maps: Maps | None = None) -> RunResult:
    """Perplexity of the unmodified model and of every setting (complete and partial, and
    explicit-only when asked) on tokens; a requested `stop` raises Stopped before the next batch or setting.
    `limits` (engine.npl.plan.MemoryLimits): layers beyond them stream. `maps`: the maps the settings' mappings
    use; settings run grouped by their first layer (a chunk), each group over every batch, holding only that
    group's maps (Maps.hold). The passes before a group's first layer are run again for each later group
    (whole passes when `explicit`): a fraction of the substituted passes' compute, for a chunk's maps held
    instead of all."""
    stop = stop or StopToken()
    device = torch.device(device)
    n_layers = len(lm.adapter.layers)
    for s in settings:
        if not s.layers or min(s.layers) < 1 or max(s.layers) >= n_layers:
            raise UserError(f"substituted layers must lie in 1-{n_layers - 1}; got {s.layers}")
    groups = _groups(settings, explicit)
    progress = _Progress(on_progress, tokens, settings, groups, n_layers)
    progress.placing()
    held = max(maps.held_bytes(group.layers) for group in groups) if maps is not None else 0
    runner = make_runner(lm, device, batch_tokens, held if device.type == "cuda" else 0, limits, tokens.shape[1], held,
                         "the maps")
    run = _Substitution(lm.adapter, runner, settings, explicit, DeviceTimer(device, SECONDS), progress, stop)
    batches = seq_batches(len(tokens), tokens.shape[1], batch_tokens)
    for group in groups:
        if maps is not None:
            maps.hold(group.layers)
        with torch.inference_mode():
            for lo, hi in batches:
                stop.check()
                run.batch(group, tokens[lo:hi])
    return run.result()


@dataclass
class _Group:
    """The settings that start at one layer: they run together, over every batch, from the hidden state the
    unmodified pass has there."""
    start: int          # the first substituted layer (0: no setting, the unmodified pass alone)
    members: list[int]  # the settings' indices, in the order given
    layers: list[int]   # the layers they substitute: the maps held while the group runs
    first: bool         # the first group: its unmodified pass gives the model's own loss
    whole: bool         # its unmodified pass runs to the end: for its loss (first group), for explicit-only


def _groups(settings: list[Setting], explicit: bool) -> list[_Group]:
    members: dict[int, list[int]] = {}  # first substituted layer -> its settings
    for n, s in enumerate(settings):
        members.setdefault(min(s.layers), []).append(n)
    groups = []
    for g, start in enumerate(sorted(members) or [0]):  # no setting: the unmodified pass alone
        ns = members.get(start, [])
        layers = sorted({j for n in ns for j in settings[n].layers})
        groups.append(_Group(start, ns, layers, first=g == 0, whole=g == 0 or explicit))
    return groups


class _Progress:
    """run_settings' progress in layer runs (PassProgress units: a batch's tokens per layer or LM head run): per
    group, the unmodified pass up to its first layer (every layer and the head when it runs whole), then each
    setting's layers from there and its two heads (complete and partial loss)."""

    def __init__(self, on_progress, tokens: np.ndarray, settings: list[Setting], groups: list[_Group], n_layers: int):
        lead = [n_layers + 1 if group.whole else group.start for group in groups]
        units = tokens.size * (sum(lead) + sum(n_layers + 2 - min(s.layers) for s in settings))
        self._pass = PassProgress(on_progress, len(tokens) * (tokens.shape[1] - 1), units, "placing model")

    def placing(self) -> None:
        self._pass.step()

    def ran(self, ids: torch.Tensor) -> None:
        """A layer or the LM head ran on the batch `ids`."""
        self._pass.step(ids.numel(), "substituting")


class _Substitution:
    """run_settings' passes, batch by batch, and what they add up to: the unmodified model's loss and each
    setting's (Outcome); the seconds go to `timer`, the layer runs to `progress`."""

    def __init__(self, adapter, runner, settings: list[Setting], explicit: bool, timer: DeviceTimer,
                 progress: _Progress, stop: StopToken):
        self.adapter, self.runner, self.settings, self.explicit = adapter, runner, settings, explicit
        self.n_layers = len(adapter.layers)
        self.timer, self.progress, self.stop = timer, progress, stop
        self.outcomes = [Outcome(s.labels, list(s.layers), nll_explicit=0.0 if explicit else None) for s in settings]
        self.original_nll = 0.0
        self.tokens = 0  # the unmodified pass's predictions: every batch's, once

    def result(self) -> RunResult:
        return RunResult(self.original_nll, self.tokens, self.outcomes, self.timer.seconds)

    def batch(self, group: _Group, tokens: np.ndarray) -> None:
        """One batch of sequences through a group: the unmodified pass, then each setting's substituted pass."""
        with self.timer("original" if group.first else "repeated"):
            ids = as_ids(tokens)
            at_start, final, deltas = self._unmodified(group, ids)
            if group.first:
                self.original_nll += self._nll(final, ids)
            if group.whole:
                self.progress.ran(ids)
        with self.timer("explicit"):
            for n, delta in deltas.items():
                self.outcomes[n].nll_explicit += self._nll(final + delta, ids)
        count = ids.shape[0] * (ids.shape[1] - 1)
        for n in group.members:
            self.stop.check()
            with self.timer("substituted") as span:
                self._substituted(n, group.start, at_start, ids)
                self.outcomes[n].tokens += count
            self.outcomes[n].seconds += span.seconds
        if group.first:
            self.tokens += count

    def _unmodified(self, group: _Group, ids: torch.Tensor):
        """The unmodified pass up to the group's first layer, to the end when `group.whole` -> the hidden state and
        g entering the first layer (None without a setting); the final hidden state (None unless whole); with
        explicit-only, each setting's delta: the sum over its layers j of FFN_j(replacement) - FFN_j(g_j)."""
        wanted = {group.start - 1} if group.members else set()  # where the group's passes start
        if self.explicit:
            wanted |= {k for n in group.members for j in self.settings[n].layers for k in (j - 1, j)}
        capture = GCapture(self.adapter, wanted)
        explicit_only = (_ExplicitOnly(self.adapter, capture, {n: self.settings[n] for n in group.members}, self.timer)
                         if self.explicit else None)
        capture.replace = explicit_only

        def on_layer(k, _out):
            self.progress.ran(ids)
            capture.g.pop(k - 1, None)  # no later layer reads it: keep one layer's g, not a pass's

        with capture.attached():
            hidden = run_layers(self.runner, self.runner.embed(ids), 0, group.start, on_layer)
            at_start = (hidden, capture.g[group.start - 1]) if group.members else None
            final = run_layers(self.runner, hidden, group.start, self.n_layers, on_layer) if group.whole else None
        return at_start, final, explicit_only.deltas if explicit_only is not None else {}

    def _substituted(self, n: int, start: int, at_start, ids: torch.Tensor) -> None:
        """Setting n's pass from its first layer `start` (hidden state and g_{start-1} from the unmodified pass):
        its complete and partial losses."""
        outcome = self.outcomes[n]
        hidden, g_before = at_start
        hooks = _substitution_hooks(self.adapter, self.settings[n])
        with hooks.attached():
            hooks.g[start - 1] = g_before
            out = run_layers(self.runner, hidden, start, self.n_layers, lambda _k, _out: self.progress.ran(ids))
            outcome.nll_complete += self._nll(out, ids)
            self.progress.ran(ids)
            partial = out if hooks.delta is None else out + hooks.delta
            outcome.nll_partial += self._nll(partial, ids)
            self.progress.ran(ids)

    def _nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> float:
        return float(token_nll(self.adapter, hidden, ids).double().sum())


class _ExplicitOnly:
    """GCapture's replace callback on the unmodified pass, for explicit-only: at layer k's g site, inside its call
    (a streamed layer's weights, which FFN_k needs, are on the device only then), adds each setting's
    FFN_k(replacement) - FFN_k(g_k) to its `deltas`; keeps g_k. Timed apart from the pass it runs in."""

    def __init__(self, adapter, capture: GCapture, settings: dict[int, Setting], timer: DeviceTimer):
        self.adapter, self.capture, self.settings, self.timer = adapter, capture, settings, timer
        self.deltas: dict[int, torch.Tensor] = {}

    def __call__(self, k: int, gk: torch.Tensor) -> None:
        with self.timer("explicit"):
            for n, setting in self.settings.items():
                if k in setting.layers:
                    new = setting.mapping(k, self.capture.g[k - 1], gk).to(gk.dtype)
                    d = output_difference(self.adapter, k, new, gk)
                    self.deltas[n] = d if n not in self.deltas else self.deltas[n] + d


def _substitution_hooks(adapter, setting: Setting) -> GCapture:
    """Hooks that replace the setting's layers' g, keeping partial substitution's delta."""
    replacer = _Replacer(set(setting.layers), setting.mapping)
    hooks = GCapture(adapter, set(setting.layers) | {j - 1 for j in setting.layers}, replacer, explicit=True)
    replacer.hooks = hooks
    return hooks


class _Replacer:
    """GCapture's replace callback: needs the hooks' own record of g_{j-1}."""

    def __init__(self, layers: set[int], mapping: Mapping):
        self.layers = layers
        self.mapping = mapping
        self.hooks: GCapture | None = None

    def __call__(self, k: int, g: torch.Tensor):
        if k not in self.layers:
            return None
        new = self.mapping(k, self.hooks.g[k - 1], g)
        self.hooks.g.pop(k - 1, None)  # no later layer reads it: keep one layer's g, not a chunk's
        return new


# --- Table 1 ---------------------------------------------------------------------------------------
def chunk_layers(n_layers: int, chunk_numbers: list[int], n_chunks: int = 4):
    """(chunk number, its substituted layers) for the chunks that have any (layer 0 has no previous layer)."""
    parts = make_chunks(n_layers, n_chunks)
    for c in chunk_numbers:
        layers = substituted(parts[c - 1])
        if layers:
            yield c, layers


def table1_settings(n_layers: int, maps: Maps | None, chunk_numbers: list[int], mappings=MAPPINGS,
                    seeds: int = 3, random_scale: str = "npl", n_chunks: int = 4) -> list[Setting]:
    settings = []
    for c, layers in chunk_layers(n_layers, chunk_numbers, n_chunks):
        for kind in mappings:
            if kind == "npl" and maps is None:
                raise UserError("the npl mapping needs fitted maps")
            if kind == "npl" or (kind == "random" and random_scale == "npl"):
                maps.require(layers)
            for seed in (range(seeds) if kind == "random" else [None]):
                settings.append(Setting(layers, mapping_fn(kind, maps, seed or 0, random_scale),
                                        {"mapping": kind, "chunk": c, "seed": seed}))
    return settings


def aggregate(result: RunResult, keys: tuple[str, ...]) -> list[dict]:
    """One row per distinct labels (seeds averaged: the mean of the seeds' perplexities)."""
    groups: dict[tuple, list[Outcome]] = {}
    for outcome in result.outcomes:
        groups.setdefault(tuple(outcome.labels.get(k) for k in keys), []).append(outcome)
    rows = []
    for key, outs in groups.items():
        row = dict(zip(keys, key))
        row["layers"] = outs[0].layers
        for mode in ("complete", "partial", "explicit"):
            if mode == "explicit" and outs[0].nll_explicit is None:
                continue
            values = [o.ppl(mode) for o in outs]
            row[mode] = float(np.mean(values))
            if len(outs) > 1:
                row[f"{mode}_seeds"] = values
        row["seeds"] = len(outs)
        row["tokens"] = outs[0].tokens
        row["tokens_per_s"] = sum(o.tokens for o in outs) / max(sum(o.seconds for o in outs), 1e-9)
        rows.append(row)
    return rows


def table1_rows(result: RunResult) -> list[dict]:
    return aggregate(result, ("mapping", "chunk"))


# --- Fig. 4: half the neurons of each layer one way, half another -------------------------------------
def finegrained_settings(n_layers: int, maps: Maps, chunk_numbers: list[int], metrics=RANK_METRICS,
                         grid=FINE_GRID, seeds: int = 1, random_scale: str = "npl",
                         n_chunks: int = 4) -> list[Setting]:
    """For each chunk and ranking metric: the top half of each layer's neurons (highest values of the
    metric of M_{j-1->j} on held-out data) treated one way and the bottom half another, plus 100%
    actual and 100% predicted. maps must carry metrics (Maps.from_reader(..., need_metrics=True))."""
    settings = []
    for c, layers in chunk_layers(n_layers, chunk_numbers, n_chunks):
        maps.require(layers)
        missing = [j for j in layers if j not in maps.metrics]
        if missing:
            raise UserError(f"finer-grained substitution needs the held-out metrics of the maps into layers "
                            f"{_ranges(missing)}; fit them again")
        for whole in ("actual", "predicted"):
            settings.append(Setting(layers, treatment_fn(whole, maps, 0, random_scale),
                                    {"metric": "-", "top": whole, "bottom": whole, "chunk": c, "seed": None}))
        for metric in metrics:
            masks = {j: halves(rank_values(maps.metrics[j], metric)) for j in layers}
            for top, bottom in grid:
                for seed in (range(seeds) if "random" in (top, bottom) else [None]):
                    mapping = split_fn(masks, treatment_fn(top, maps, seed or 0, random_scale),
                                       treatment_fn(bottom, maps, seed or 0, random_scale))
                    settings.append(Setting(layers, mapping, {"metric": metric, "top": top, "bottom": bottom,
                                                              "chunk": c, "seed": seed}))
    return settings


def finegrained_rows(result: RunResult) -> list[dict]:
    return aggregate(result, ("chunk", "metric", "top", "bottom"))


def forward_throughput(lm, tokens: np.ndarray, setting: Setting | None = None, device="cpu",
                       batch_tokens: int = 8192) -> float:
    """Tokens per second of a whole forward (embeddings, every layer, LM head loss), plain or with a
    substitution's hooks attached (complete and partial loss both computed, as substitution does)."""
    device = torch.device(device)
    adapter = lm.adapter
    seq_len = tokens.shape[1]
    runner = make_runner(lm, device, batch_tokens, seq_len=seq_len)
    n_layers = len(adapter.layers)
    timer = DeviceTimer(device, ["forward"])
    with timer("forward"), torch.inference_mode():
        for lo, hi in seq_batches(len(tokens), seq_len, batch_tokens):
            ids = as_ids(tokens[lo:hi])
            hidden = runner.embed(ids)
            if setting is None:
                token_nll(adapter, run_layers(runner, hidden, 0, n_layers), ids)
                continue
            hooks = _substitution_hooks(adapter, setting)
            with hooks.attached():
                out = run_layers(runner, hidden, 0, n_layers)
                token_nll(adapter, out, ids)
                token_nll(adapter, out if hooks.delta is None else out + hooks.delta, ids)
    return tokens.size / timer.seconds["forward"]
