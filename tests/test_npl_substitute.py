"""Complete and partial substitution against a hand-built computation: each FFN of the model is
swapped for a hand-written one that computes g, replaces it and keeps the explicit contribution
of the computed g, and the final hidden state is patched before the final norm by a hook."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from ffnscope.engine.model.sites import Adapter
from ffnscope.engine.model.load import LoadedModel
from ffnscope.engine.npl.layout import chunks, parse_chunks, parse_pairs, substituted
from ffnscope.engine.npl.substitute import (Maps, Setting, finegrained_settings, halves, mapping_fn, random_matrix,
                                   run_settings, split_fn, table1_rows, table1_settings, treatment_fn)
from tests.tiny_models import build

N_LAYERS, D_FFN = 4, 64


class HandFFN(nn.Module):
    """The FFN of one layer written out, with the activation replaced by plan[j](g_prev, g)."""

    def __init__(self, family: str, mlp: nn.Module, j: int, plan: dict, state: dict):
        super().__init__()
        self.family, self.mlp, self.j, self.plan, self.state = family, mlp, j, plan, state

    def forward(self, x):
        m = self.mlp
        if self.family == "llama":
            g = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
            w_out, bias = m.down_proj.weight.T, None                   # nn.Linear: (out, in)
        else:
            g = m.act(m.c_fc(x))
            w_out, bias = m.c_proj.weight, m.c_proj.bias               # GPT-2 Conv1D: (in, out)
        new = self.plan[self.j](self.state["g"][self.j - 1], g) if self.j in self.plan else g
        self.state["g"][self.j] = g
        if self.state["mode"] == "explicit":   # later layers see the actual output, the end the replaced one
            self.state["explicit"] = self.state["explicit"] + (new - g) @ w_out
            new = g
        else:
            self.state["explicit"] = self.state["explicit"] + (g - new) @ w_out   # actual minus replaced output
        out = new @ w_out
        return out + bias if bias is not None else out


def hand_built_ppl(model, family: str, ids: torch.Tensor, plan: dict) -> tuple[float, float, float]:
    """-> (complete, partial, explicit-only) perplexity computed by hand."""
    layers = model.model.layers if family == "llama" else model.transformer.h
    final_norm = model.model.norm if family == "llama" else model.transformer.ln_f
    results = []
    for mode in ("complete", "partial", "explicit"):
        partial = mode != "complete"
        state = {"g": {}, "explicit": 0.0, "mode": mode}
        originals = [layer.mlp for layer in layers]
        for j, layer in enumerate(layers):
            layer.mlp = HandFFN(family, originals[j], j, plan, state)
        handle = final_norm.register_forward_pre_hook(
            lambda _m, args: (args[0] + state["explicit"],) if partial else None)
        try:
            with torch.no_grad():
                logits = model(input_ids=ids).logits.double()
        finally:
            handle.remove()
            for j, layer in enumerate(layers):
                layer.mlp = originals[j]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        results.append(math.exp(float(nll.mean())))
    return results[0], results[1], results[2]


def _lm(family: str, seed: int = 3) -> LoadedModel:
    model = build(family, N_LAYERS, seed)
    with torch.no_grad():  # larger activations, so that substitution visibly matters
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return LoadedModel(model, None, Adapter(model), family, family, f"fp-{family}-{seed}")


def _maps(lm: LoadedModel, seed: int = 0) -> Maps:
    rng = np.random.default_rng(seed)
    weights = {j: (rng.normal(size=(D_FFN, D_FFN)) * 0.3, rng.normal(size=D_FFN) * 0.1) for j in range(1, N_LAYERS)}
    metrics = {j: {"pearson": rng.uniform(-1, 1, D_FFN), "l2": rng.uniform(0, 1, D_FFN),
                   "target_mean": rng.normal(size=D_FFN), "target_var": rng.uniform(0, 2, D_FFN)}
               for j in range(1, N_LAYERS)}
    return Maps(lm.fingerprint, D_FFN, weights, metrics)


def _hand_plan(kind: str, layers, maps: Maps, seed: int = 0) -> dict:
    def predict(j):
        w, b = (torch.as_tensor(a, dtype=torch.float32) for a in maps.weights[j])
        return lambda prev, g: prev @ w + b
    make = {"npl": predict,
            "zero": lambda j: (lambda prev, g: torch.zeros_like(g)),
            "identical": lambda j: (lambda prev, g: prev),
            "random": lambda j: (lambda prev, g: prev @ random_matrix(seed, j, D_FFN, maps.random_std(j, "npl"),
                                                                      "cpu"))}
    return {j: make[kind](j) for j in layers}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_complete_and_partial_equal_the_hand_built_computation(family):
    lm = _lm(family)
    maps = _maps(lm)
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))
    cases = [("npl", [2, 3]), ("npl", [1]), ("zero", [1, 2]), ("identical", [2, 3]), ("random", [3])]
    settings = [Setting(layers, mapping_fn(kind, maps, seed=0), {"kind": kind}) for kind, layers in cases]
    run = run_settings(lm, ids.numpy().astype(np.int32), settings, batch_tokens=48, explicit=True)  # 3 seqs a batch
    with torch.no_grad():
        ref_logits = lm.model(input_ids=ids).logits.double()
    ref = -torch.log_softmax(ref_logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    assert run.original_ppl == pytest.approx(math.exp(float(ref)), rel=1e-5)
    for (kind, layers), outcome in zip(cases, run.outcomes):
        complete, partial, explicit = hand_built_ppl(lm.model, family, ids, _hand_plan(kind, layers, maps))
        assert outcome.ppl("complete") == pytest.approx(complete, rel=1e-5), (kind, layers)
        assert outcome.ppl("partial") == pytest.approx(partial, rel=1e-5), (kind, layers)
        assert outcome.ppl("explicit") == pytest.approx(explicit, rel=1e-5), (kind, layers)
        assert abs(explicit / partial - 1) > 1e-4
        assert abs(complete / run.original_ppl - 1) > 1e-3       # the substitution did something
        if layers == [N_LAYERS - 1]:   # the last layer: partial keeps its explicit output, nothing else changed
            assert partial == pytest.approx(run.original_ppl, rel=1e-5)
        else:
            assert abs(partial / complete - 1) > 1e-5


def test_halves_substitution_equals_hand_built():
    lm = _lm("llama")
    maps = _maps(lm)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    masks = {j: halves(maps.metrics[j]["l2"]) for j in (2, 3)}
    setting = Setting([2, 3], split_fn(masks, treatment_fn("zero", maps, 0, "npl"),
                                       treatment_fn("predicted", maps, 0, "npl")), {})
    run = run_settings(lm, ids.numpy().astype(np.int32), [setting])
    npl = _hand_plan("npl", [2, 3], maps)
    plan = {j: (lambda prev, g, j=j: torch.where(torch.as_tensor(masks[j]), torch.zeros_like(g), npl[j](prev, g)))
            for j in (2, 3)}
    complete, partial, _ = hand_built_ppl(lm.model, "llama", ids, plan)
    assert run.outcomes[0].ppl("complete") == pytest.approx(complete, rel=1e-5)
    assert run.outcomes[0].ppl("partial") == pytest.approx(partial, rel=1e-5)
    mask = masks[2]
    assert mask.sum() == D_FFN // 2
    assert maps.metrics[2]["l2"][mask].min() >= maps.metrics[2]["l2"][~mask].max()   # top = highest values


def test_table1_layout_seeds_and_the_finegrained_grid():
    assert [len(c) for c in chunks(30)] == [8, 8, 7, 7] and chunks(30)[0][0] == 0 and chunks(30)[3][-1] == 29
    assert substituted(chunks(30)[0]) == list(range(1, 8))    # layer 0 keeps its actual activation
    assert parse_chunks("2,4") == [2, 4] and parse_chunks(None) == [1, 2, 3, 4]
    assert parse_pairs("adjacent", 4) == [(0, 1), (1, 2), (2, 3)]
    assert len(parse_pairs("grid:6", 30)) == 25 and (24, 0) in parse_pairs("grid:6", 30)
    lm = _lm("llama")
    maps = _maps(lm)
    eight = Maps("fp", D_FFN, {j: maps.weights[1] for j in range(1, 8)})
    settings = table1_settings(8, eight, [1, 2, 3, 4], seeds=2)
    assert {s.labels["mapping"] for s in settings} == {"random", "zero", "identical", "npl"}
    assert [s.layers for s in settings if s.labels["mapping"] == "npl"] == [[1], [2, 3], [4, 5], [6, 7]]
    assert sum(s.labels["mapping"] == "random" for s in settings) == 8
    small = [s for s in table1_settings(N_LAYERS, maps, [3], seeds=2) if s.labels["mapping"] in ("random", "zero")]
    run = run_settings(lm, np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32), small)
    rows = {r["mapping"]: r for r in table1_rows(run)}
    seeds = [o.ppl("complete") for o in run.outcomes if o.labels["mapping"] == "random"]
    assert seeds[0] != seeds[1] and rows["random"]["complete"] == pytest.approx(np.mean(seeds))
    assert rows["random"]["seeds"] == 2 and rows["zero"]["seeds"] == 1
    fine = finegrained_settings(N_LAYERS, maps, [4], metrics=("pearson", "variance"), seeds=1)
    assert len(fine) == 2 + 2 * 8 and all(s.layers == [3] for s in fine)


def test_a_run_holds_one_chunks_maps_at_a_time_and_equals_holding_them_all():
    """Maps read from a sidecar are held a chunk at a time (Maps.hold): each read once, at most one chunk's
    held, and every perplexity equal to the bit to a run with every map in memory, explicit-only included."""
    model = build("llama", 8, 5)
    lm = LoadedModel(model, None, Adapter(model), "llama", "llama", "fp-8")
    rng = np.random.default_rng(4)
    weights = {j: (rng.normal(size=(D_FFN, D_FFN)) * 0.3, rng.normal(size=D_FFN) * 0.1) for j in range(1, 8)}
    metrics = {j: {"pearson": rng.uniform(-1, 1, D_FFN), "l2": rng.uniform(0, 1, D_FFN),
                   "target_mean": rng.normal(size=D_FFN), "target_var": rng.uniform(0, 2, D_FFN)}
               for j in range(1, 8)}
    reads, most = [], [0]

    def load(j):
        reads.append(j)
        most[0] = max(most[0], len(lazy.weights) + 1)
        return weights[j]

    lazy = Maps(lm.fingerprint, D_FFN, metrics=metrics, load=load, layers=range(1, 8))
    whole = Maps(lm.fingerprint, D_FFN, weights, metrics)
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(3)).numpy().astype(np.int32)
    runs = []
    for maps in (whole, lazy):
        settings = (table1_settings(8, maps, [1, 2, 3, 4], seeds=2)
                    + finegrained_settings(8, maps, [3], metrics=("l2",), seeds=1))
        runs.append(run_settings(lm, ids, settings, batch_tokens=32, explicit=True, maps=maps))
    assert sorted(reads) == list(range(1, 8)) and most[0] == 2  # the chunks' substituted layers: 1 | 2,3 | 4,5 | 6,7
    assert runs[0].original_nll == runs[1].original_nll and runs[0].tokens == runs[1].tokens == 6 * 15
    for a, b in zip(runs[0].outcomes, runs[1].outcomes, strict=True):
        assert (a.labels, a.nll_complete, a.nll_partial, a.nll_explicit, a.tokens) == \
               (b.labels, b.nll_complete, b.nll_partial, b.nll_explicit, b.tokens)
    assert len({o.nll_complete for o in runs[1].outcomes}) > 10  # the settings differ
