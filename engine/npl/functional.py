"""Functional and background neurons under NPL (paper Sec. 5), on held-out tokens.

Importance of neuron i of layer l for a token property P (paper Eq. 7, as printed there):

    mu_P = 1 - ((1 - beta) var(g_i | P) + beta var(g_i | not P)) / var(g_i)

beta the fraction of tokens with P (population variances over the property's universe of tokens).
Note the weights: the paper puts (1 - beta) on the P side, the reverse of Gurnee et al.'s variance
reduction; we follow the paper, so for a rare property a neuron that is steady on it scores high.
Important neurons N_P = {i : mu_P > theta}. The predictability score s_i of a neuron is its
held-out L2 error (engine.npl.fit) under the maps into its layer (the mean over the fitted maps
from other layers; M_{l-1->l} for an adjacent fit); S_P = mean of s over N_P, averaged over the
properties of a kind that have important neurons. Higher S means harder to predict.

Properties (kinds):
- unigram / bigram / trigram: the n-gram ending at the token is one of the `top_ngrams` most
  frequent n-grams of the held-out text (at least `min_count` occurrences; n-grams touching the
  start token are left out, as in the recording's n-gram statistics);
- hard / easy: the model's loss predicting the next token is in the top / bottom `loss_fraction`
  (universe: positions that predict a token, the last position excluded);
- pos_successive: the position lies in one span of `span` consecutive positions (one property per
  span); pos_oscillatory: position % k == 0 for k in 2, 4, 8; pos_arbitrary: a random set of `span`
  positions (3 seeded draws);
- random_tokens: a seeded random `random_fraction` of the tokens (the paper's random baseline).
Baselines per layer: S_O, the mean score of all neurons, and S_R, the mean score of a random half
of the neurons averaged over `background_draws` seeded draws (DESIGN.md: "against all and random
neurons"). Background neurons: s_i < S_R (paper Sec. 5.4).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ffnscope.cache.schema import encode_grams
from ffnscope.engine.jobs.stop import StopToken
from ffnscope.engine.model.batches import seq_batches
from ffnscope.engine.npl.capture import GCapture, PassProgress, as_ids, make_runner, run_layers
from ffnscope.engine.npl.report import FUNCTIONAL_KINDS as KINDS  # the property kinds, in table order


@dataclass
class FunctionalParams:
    theta: float = 0.5
    top_ngrams: int = 100
    min_count: int = 20
    loss_fraction: float = 0.1
    span: int = 0                 # 0: seq_len // 8
    random_fraction: float = 0.1
    background_draws: int = 10
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Group:
    """Properties of one kind that no token has two of: ids[token] = property index or -1.
    By-position groups hold ids per position (T,), token groups per token (n, T)."""
    ids: np.ndarray
    first: int            # column of its first property
    count: int
    universe: str         # "all" tokens, or "defined": positions that predict a token
    by_position: bool


@dataclass
class Properties:
    names: list[tuple[str, str]]      # (kind, label) per property, in column order
    groups: list[Group]


def build_properties(tokens: np.ndarray, nll: np.ndarray, vocab: int, first_pos: int,
                     params: FunctionalParams) -> Properties:
    n, T = tokens.shape
    names: list[tuple[str, str]] = []
    groups: list[Group] = []

    def add(labels, ids, universe="all", by_position=False):
        groups.append(Group(np.asarray(ids, np.int64), len(names), len(labels), universe, by_position))
        names.extend(labels)

    for order, kind in ((1, "unigram"), (2, "bigram"), (3, "trigram")):
        if T < order + first_pos:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.int64), order, axis=1)
        keys = np.full((n, T), -1, np.int64)
        keys[:, order - 1:] = encode_grams(windows, vocab)
        valid = np.zeros((n, T), bool)
        valid[:, first_pos + order - 1:] = True
        gram, count = np.unique(keys[valid], return_counts=True)
        keep = count >= params.min_count
        gram, count = gram[keep], count[keep]
        top = np.sort(gram[np.argsort(-count, kind="stable")[: params.top_ngrams]])
        ids = np.full((n, T), -1, np.int64)
        if len(top):
            where = np.searchsorted(top, keys)
            hit = valid & (where < len(top)) & (top[np.minimum(where, len(top) - 1)] == keys)
            ids[hit] = where[hit]
        add([(kind, str(int(g))) for g in top], ids)

    if T > 1 and nll.size:
        lo, hi = np.quantile(nll, [params.loss_fraction, 1 - params.loss_fraction])
        loss = np.full((n, T), np.nan)
        loss[:, :-1] = nll
        with np.errstate(invalid="ignore"):
            add([("hard", f"loss >= {hi:.3f}")], np.where(loss >= hi, 0, -1), "defined")
            add([("easy", f"loss <= {lo:.3f}")], np.where(loss <= lo, 0, -1), "defined")

    span = params.span or max(1, T // 8)
    pos = np.arange(T)
    add([("pos_successive", f"{a}-{min(a + span, T) - 1}") for a in range(0, T, span)], pos // span,
        by_position=True)
    rng = np.random.default_rng([params.seed, 5])
    for k in (2, 4, 8):
        add([("pos_oscillatory", f"every {k}")], np.where(pos % k == 0, 0, -1), by_position=True)
    for draw in range(3):
        chosen = np.zeros(T, bool)
        chosen[rng.choice(T, size=min(span, T), replace=False)] = True
        add([("pos_arbitrary", f"draw {draw}")], np.where(chosen, 0, -1), by_position=True)
    add([("random_tokens", f"{params.random_fraction:g}")],
        np.where(rng.random((n, T)) < params.random_fraction, 0, -1))
    return Properties(names, groups)


class _Moments:
    """Per layer: count, sum and sum of squares of g per property and per universe (float64, shifted)."""

    def __init__(self, props: Properties, d: int, device):
        self.props = props
        p = len(props.names)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.n, self.s, self.q = z(p), z(p, d), z(p, d)
        self.un = {"all": 0.0, "defined": 0.0}
        self.us = {"all": z(d), "defined": z(d)}
        self.uq = {"all": z(d), "defined": z(d)}
        self.shift: torch.Tensor | None = None
        self._onehot = {}

    def update(self, g: torch.Tensor, rows: slice) -> None:
        x = g.double()                                  # (B, T, d)
        b, t, d = x.shape
        if self.shift is None:
            self.shift = x.reshape(-1, d).mean(0)
        x = x - self.shift
        xx = x * x
        ps, pq = x.sum(0), xx.sum(0)                    # per position (T, d)
        self.un["all"] += b * t
        self.us["all"] += ps.sum(0)
        self.uq["all"] += pq.sum(0)
        self.un["defined"] += b * (t - 1)
        self.us["defined"] += ps[:-1].sum(0)
        self.uq["defined"] += pq[:-1].sum(0)
        flat, flat2 = x.reshape(-1, d), xx.reshape(-1, d)
        for k, group in enumerate(self.props.groups):
            cols = slice(group.first, group.first + group.count)
            if group.by_position:
                if k not in self._onehot:
                    onehot = np.zeros((group.count, t))
                    hit = group.ids >= 0
                    onehot[group.ids[hit], np.flatnonzero(hit)] = 1.0
                    self._onehot[k] = torch.as_tensor(onehot, device=x.device)
                m = self._onehot[k]
                self.n[cols] += m.sum(1) * b
                self.s[cols] += m @ ps
                self.q[cols] += m @ pq
                continue
            idx = torch.as_tensor(group.ids[rows].reshape(-1), device=x.device)
            hit = torch.nonzero(idx >= 0).squeeze(1)
            if len(hit):
                col = idx[hit] + group.first
                self.n.index_add_(0, col, torch.ones(len(col), dtype=torch.float64, device=x.device))
                self.s.index_add_(0, col, flat[hit])
                self.q.index_add_(0, col, flat2[hit])

    def importance(self) -> np.ndarray:
        """(properties, d) mu_P (paper Eq. 7); NaN where undefined (P empty or everything)."""
        out = []
        for group in self.props.groups:
            cols = slice(group.first, group.first + group.count)
            un, us, uq = self.un[group.universe], self.us[group.universe], self.uq[group.universe]
            n_in = self.n[cols][:, None]
            n_out = un - n_in

            def var(s, q, n):
                m = s / n.clamp_min(1)
                return (q / n.clamp_min(1) - m * m).clamp_min(0)

            mean = us / max(un, 1)
            total = (uq / max(un, 1) - mean * mean).clamp_min(0)[None]
            v_in = var(self.s[cols], self.q[cols], n_in)
            v_out = var(us - self.s[cols], uq - self.q[cols], n_out)
            beta = n_in / max(un, 1)
            mu = 1 - ((1 - beta) * v_in + beta * v_out) / total
            defined = (n_in > 0) & (n_out > 0) & (total > 0)
            out.append(torch.where(defined, mu, torch.full_like(mu, float("nan"))))
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, self.s.shape[1]))


@dataclass
class FunctionalResult:
    layers: list[int]
    names: list[tuple[str, str]]
    importance: dict[int, np.ndarray]     # layer -> (properties, d)
    score: dict[int, np.ndarray]          # layer -> s (d,)
    rows: list[dict]                      # per layer and kind: S_P, neurons, properties
    s_all: dict[int, float]
    s_random: dict[int, float]
    background: dict[int, np.ndarray]     # layer -> (d,) bool
    params: dict


def summarize(layers, names, importance, score, params: FunctionalParams) -> FunctionalResult:
    rows, s_all, s_random, background = [], {}, {}, {}
    rng = np.random.default_rng([params.seed, 11])
    kinds = np.array([k for k, _ in names])
    for layer in layers:
        s = np.asarray(score[layer], np.float64)
        d = len(s)
        finite = np.isfinite(s)
        s_all[layer] = float(s[finite].mean()) if finite.any() else float("nan")
        draws = [s[idx][np.isfinite(s[idx])].mean() for idx in
                 (rng.choice(d, size=max(1, d // 2), replace=False) for _ in range(params.background_draws))]
        s_random[layer] = float(np.mean(draws))
        background[layer] = finite & (s < s_random[layer])
        mu = importance[layer]
        for kind in KINDS:
            which = np.flatnonzero(kinds == kind)
            per_prop, union = [], np.zeros(d, bool)
            for p in which:
                important = np.nan_to_num(mu[p], nan=-np.inf) > params.theta
                important &= finite
                if important.any():
                    per_prop.append(float(s[important].mean()))
                    union |= important
            rows.append({"layer": int(layer), "kind": kind, "S": float(np.mean(per_prop)) if per_prop else None,
                         "properties": int(len(which)), "with_important": len(per_prop),
                         "neurons": int(union.sum()), "S_all": s_all[layer], "S_random": s_random[layer],
                         "background_frac": float(background[layer].mean())})
    return FunctionalResult(list(layers), names, importance, score, rows, s_all, s_random, background,
                            params.as_dict())


def functional_neurons(lm, tokens: np.ndarray, nll: np.ndarray, score: dict[int, np.ndarray],
                       params: FunctionalParams | None = None, device="cpu", batch_tokens: int = 8192,
                       on_progress=None, stop: StopToken | None = None, limits=None) -> FunctionalResult:
    """One pass over held-out tokens (n, T) with the unmodified model's per-token loss nll (n, T-1)
    and each layer's predictability scores; -> importance, S_P per kind, background neurons."""
    from ffnscope.engine.data.packing import special_ids

    stop = stop or StopToken()
    params = params or FunctionalParams()
    device = torch.device(device)
    adapter = lm.adapter
    layers = sorted(score)
    start_id, _ = special_ids(lm.tokenizer)
    first_pos = 1 if start_id is not None and len(tokens) and (tokens[:, 0] == start_id).all() else 0
    vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    # progress in layer runs (tokens x layers), the pass's only token work
    progress = PassProgress(on_progress, tokens.size, tokens.size * (max(score, default=0) + 1), "counting properties")
    progress.step()
    props = build_properties(tokens, nll, vocab, first_pos, params)
    d = adapter.d_ffn
    moments = {layer: _Moments(props, d, device) for layer in layers}
    progress.step(phase="placing model")
    seq_len = tokens.shape[1]
    runner = make_runner(lm, device, batch_tokens, limits=limits, seq_len=seq_len)  # layers beyond limits stream
    hooks = GCapture(adapter, layers)
    with torch.inference_mode(), hooks.attached():
        for lo, hi in seq_batches(len(tokens), seq_len, batch_tokens):
            stop.check()
            hidden = runner.embed(as_ids(tokens[lo:hi]))

            def on_layer(k, _out):
                progress.step((hi - lo) * seq_len, "functional neurons")
                if k in moments:
                    moments[k].update(hooks.g.pop(k), slice(lo, hi))

            run_layers(runner, hidden, 0, max(layers) + 1, on_layer)
    progress.step(phase="summarizing")
    importance = {layer: m.importance() for layer, m in moments.items()}
    return summarize(layers, props.names, importance, score, params)
