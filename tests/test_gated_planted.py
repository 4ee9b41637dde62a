"""Gated FFNs (g = act(gate) * up): contexts rank by what the firing rule thresholds (act(gate)) and
show g signed; a detector's update direction is the sign of g at its triggers' firings, not of g's
mean over all tokens; the start token yields at most one context; the suppression flag is the sign
of the stored score. Planted in layer 0 of a tiny Llama."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ffnscope.cache.reader import CacheReader
from ffnscope.cache.store import read_state
from ffnscope.engine.explore.detail import top_contexts
from ffnscope.engine.explore.tables import neuron_table
from ffnscope.engine.analysis.job import analyze
from tests.helpers import record_tiny
from tests.tiny_models import BOS, build, save

# residual dimensions of layer 0's FFN input: every embedding entry is +1 or -1, so the RMS norm
# divides by exactly 1 and each flag reaches the FFN as it is
AB_DIM, CD_DIM, BOS_DIM, E_DIM, ONE_DIM, CONTENT = range(6)
NEG, NULL, START = 5, 6, 7           # planted neurons
AB, CD, E = (ord("a"), ord("b")), (ord("c"), ord("h")), ord("e")
PROMOTED_AB, PROMOTED_CD = ord("z"), ord("y")


def _flag(vocab: int, on) -> torch.Tensor:
    flag = torch.full((vocab,), -1.0)
    flag[list(on)] = 1.0
    return flag


def _rows(w: torch.Tensor, neuron: int, weights: dict) -> None:
    w[neuron].zero_()
    for dim, value in weights.items():
        w[neuron, dim] = value


@torch.no_grad()
def planted_llama():
    """NEG fires (silu(gate) = 4.97) exactly on 'a', 'b' where up = -1, so g = -4.97 there; elsewhere
    silu(gate) = -0.28 (no fire) and up = -20, so g = +5.57: g's mean over all tokens is positive and
    its largest values are where the neuron does not fire. Its output row points toward 'a', 'b', so
    the actual update (negative g) suppresses them. NULL is the same on 'c', 'h' with the row pointing
    away from them: its actual update promotes its triggers. START fires hardest on the start token
    (silu(8)) and also on 'e' (silu(3)), g = act."""
    model = build("llama")
    emb = model.model.embed_tokens.weight
    vocab, d = emb.shape
    gen = torch.Generator().manual_seed(1)
    emb.copy_(torch.where(torch.rand(vocab, d, generator=gen) < 0.5, -1.0, 1.0))
    emb[:, AB_DIM] = _flag(vocab, AB)
    emb[:, CD_DIM] = _flag(vocab, CD)
    emb[:, BOS_DIM] = _flag(vocab, [BOS])
    emb[:, E_DIM] = _flag(vocab, [E])
    emb[:, ONE_DIM] = 1.0
    layer = model.model.layers[0]
    layer.self_attn.o_proj.weight.zero_()         # layer 0's FFN reads the token embedding alone
    layer.post_attention_layernorm.weight.fill_(1.0)
    mlp = layer.mlp
    for neuron, dim in ((NEG, AB_DIM), (NULL, CD_DIM)):
        _rows(mlp.gate_proj.weight, neuron, {dim: 3.14, ONE_DIM: 1.86})    # +5 on triggers, -1.28 elsewhere
        _rows(mlp.up_proj.weight, neuron, {dim: 9.5, ONE_DIM: -10.5})     # -1 on triggers, -20 elsewhere
    _rows(mlp.gate_proj.weight, START, {BOS_DIM: 5.5, E_DIM: 3.0, ONE_DIM: 5.5})  # 8 on BOS, 3 on 'e', else -3
    _rows(mlp.up_proj.weight, START, {ONE_DIM: 1.0})
    head = model.lm_head.weight
    for token in (*AB, *CD, PROMOTED_AB, PROMOTED_CD):
        v = torch.randn(d, generator=gen)
        head[token] = 3.0 * v / v.norm()
    toward_ab = head[AB[0]] + head[AB[1]] - 3 * head[PROMOTED_AB]
    away_cd = 3 * head[PROMOTED_CD] - head[CD[0]] - head[CD[1]]
    mlp.down_proj.weight[:, NEG] = toward_ab / toward_ab.norm()
    mlp.down_proj.weight[:, NULL] = away_cd / away_cd.norm()
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("gated")
    model_dir = save(planted_llama(), tmp / "model")
    cache = tmp / "c.h5"
    record_tiny(cache, model_dir, [text_file], tokens=1024, tau=1.0, ngram_max_freq=1.0, layers="0-1")
    analyze(cache, log=lambda _m: None)
    with CacheReader(cache) as reader:
        table = neuron_table(reader, [0])
    return cache, {row["neuron"]: row for row in table.rows()}


def test_planted_premise(planted):
    """The neurons are what the test needs: detectors of their tokens whose g's mean over all tokens
    is positive while g at their firings is negative."""
    _, rows = planted
    for neuron, triggers in ((NEG, AB), (NULL, CD)):
        row = rows[neuron]
        assert row["token_detector"] is True
        assert sorted(row["trigger_tokens"]) == sorted(chr(t) for t in triggers)
        assert row["g_mean"] > 0 and row["g_max"] > 5


def test_contexts_rank_by_act_and_show_signed_g(planted):
    cache, _ = planted
    with CacheReader(cache) as reader:
        contexts = top_contexts(reader, reader.vocab, 0, NEG)
    assert len(contexts) == reader.meta["recording"]["topk"]
    for c in contexts:
        assert c.token in ("a", "b")                    # where it fires, not where g is largest
        assert c.value == pytest.approx(4.966, abs=1e-2)  # act(gate) there
        assert c.g == pytest.approx(-4.966, abs=1e-2)     # and g, signed


def test_at_most_one_start_token_context(planted):
    cache, _ = planted
    with CacheReader(cache) as reader:
        contexts = top_contexts(reader, reader.vocab, 0, START)
        tokens = reader.tokens()
    assert len(contexts) == reader.meta["recording"]["topk"]
    assert contexts[0].position == 0 and contexts[0].value == pytest.approx(8.0, abs=1e-2)
    assert [c.position for c in contexts].count(0) == 1
    assert all(c.token == "e" and c.value == pytest.approx(2.857, abs=1e-2) for c in contexts[1:])
    assert all(tokens[c.sequence, c.position] == E for c in contexts[1:])


def test_update_sign_from_g_at_trigger_firings(planted):
    """NEG's update (g < 0 at its triggers) suppresses 'a', 'b' although g's mean is positive;
    NULL's update promotes its triggers and must not be flagged."""
    _, rows = planted
    neg, null = rows[NEG], rows[NULL]
    assert neg["trigger_g"] == pytest.approx(-4.966, abs=1e-2)
    assert neg["suppresses_z"] is True and neg["trigger_logit_z"] < -3
    assert neg["suppresses_logit"] is True and neg["trigger_logit"] < 0
    assert chr(PROMOTED_AB) in neg["top_promoted"][:3]
    assert set("ab") <= set(neg["top_suppressed"][:5])
    assert null["trigger_g"] == pytest.approx(-4.966, abs=1e-2)
    assert null["suppresses_z"] is False and null["trigger_logit_z"] > 3
    assert null["suppresses_logit"] is False and null["trigger_logit"] > 0
    assert set("ch") <= set(null["top_promoted"][:5])


def test_flag_is_the_sign_of_the_stored_score(planted):
    _, rows = planted
    scored = [row for row in rows.values() if row["trigger_logit_z"] is not None]
    assert len(scored) >= 2
    for row in scored:  # in both readings
        assert row["suppresses_z"] is (row["trigger_logit_z"] < 0)
        assert row["suppresses_logit"] is (row["trigger_logit"] < 0)


def test_trigger_g_sums_are_recorded(planted):
    """Unigram (token, neuron) fire pairs carry the sum of g at those fires."""
    cache, _ = planted
    state = read_state(cache, "testing")
    uni = state.layers[0].ngrams[1]
    for neuron, triggers in ((NEG, AB), (START, (E,))):
        for token in triggers:
            at = np.flatnonzero((uni.neuron == neuron) & (uni.gram == token))
            assert len(at) == 1 and uni.count[at[0]] > 0
            expected = -4.966 if neuron == NEG else 2.857
            assert uni.g_sum[at[0]] / uni.count[at[0]] == pytest.approx(expected, abs=1e-2)


def test_older_cache_schema_is_refused_in_one_line(planted, tmp_path):
    import shutil

    import h5py

    from ffnscope.cache.errors import UserError

    old = tmp_path / "old.h5"
    shutil.copyfile(planted[0], old)
    with h5py.File(old, "a") as f:
        f.attrs["schema_version"] = 1
    with pytest.raises(UserError) as exc:
        CacheReader(old)
    message = str(exc.value)
    assert "schema v1" in message and "record it again" in message and "\n" not in message
