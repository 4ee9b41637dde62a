"""Tiny random models of every supported family, built in code and saved as local HF directories,
and weight surgery that plants the behaviour the recorder must find."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from tests.tiny_tokenizer import make_tokenizer

VOCAB, BOS, EOS, PAD = 259, 256, 257, 258
D, FFN, HEADS, MAXPOS = 32, 64, 4, 64
_COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)

CONFIGS = {
    "opt": lambda n: tf.OPTConfig(hidden_size=D, ffn_dim=FFN, num_hidden_layers=n, num_attention_heads=HEADS,
                                  max_position_embeddings=MAXPOS, word_embed_proj_dim=D, **_COMMON),
    "gpt2": lambda n: tf.GPT2Config(n_embd=D, n_inner=FFN, n_layer=n, n_head=HEADS, n_positions=MAXPOS, **_COMMON),
    "gptj": lambda n: tf.GPTJConfig(n_embd=D, n_inner=FFN, n_layer=n, n_head=HEADS, rotary_dim=4,
                                    n_positions=MAXPOS, **_COMMON),
    "gpt_neox": lambda n: tf.GPTNeoXConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=n,
                                           num_attention_heads=HEADS, max_position_embeddings=MAXPOS, **_COMMON),
    "llama": lambda n: tf.LlamaConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=n,
                                      num_attention_heads=HEADS, num_key_value_heads=2,
                                      max_position_embeddings=MAXPOS, **_COMMON),
    "mistral": lambda n: tf.MistralConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=n,
                                          num_attention_heads=HEADS, num_key_value_heads=2,
                                          max_position_embeddings=MAXPOS, sliding_window=None, **_COMMON),
    "qwen2": lambda n: tf.Qwen2Config(hidden_size=D, intermediate_size=FFN, num_hidden_layers=n,
                                      num_attention_heads=HEADS, num_key_value_heads=2,
                                      max_position_embeddings=MAXPOS, **_COMMON),
    "gemma": lambda n: tf.GemmaConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=n,
                                      num_attention_heads=HEADS, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=MAXPOS, **_COMMON),
    "gemma2": lambda n: tf.Gemma2Config(hidden_size=D, intermediate_size=FFN, num_hidden_layers=n,
                                        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=MAXPOS, sliding_window=8, **_COMMON),
}


def build(model_type: str, n_layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[model_type](n_layers)).eval()


def save(model, directory: Path) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def tiny_model_dir(directory: Path, model_type: str, n_layers: int = 4, seed: int = 0) -> Path:
    return save(build(model_type, n_layers, seed), directory)


# --- planted behaviour in OPT's first layer -------------------------------------------------
# Layer 0 of the planted OPT sees token + position embeddings and one attention head that copies
# "the previous token is 't'" into the residual stream. Residual dimensions carry +5/-5 flags set
# in the embeddings; each planted neuron reads one or two of them, so whether it fires depends on
# exactly the token, position or bigram we chose. Every flag has a mirror (minus it), so the layer
# norms' mean and scale never change and a neuron sees a flag only if it reads it.
TOKEN_DIM, POS_DIM, OSC_DIM, SIDE_DIM, VARIANT_DIM, HALF_DIM, BOS_DIM, T_DIM, H_DIM = range(9)
N_FLAGS = 9
CLOCK_DIMS = (18, 19)    # 5 cos(theta p), 5 sin(theta p): lets a query find the key one position back
PREV_DIM = 22            # written by the attention head: +5 where the previous token is 't'
CONTENT_DIMS = 24        # dimensions from here on keep their random values (what unplanted neurons read)
THETA = torch.pi / 64
DEAD, DETECTOR, VARIANTS, POSITIONAL, OSCILLATING, ONE_SIDED, MANY, BOS_AND_A = 3, 5, 6, 7, 9, 10, 11, 12
BIGRAM = 13              # fires on 'h' after 't' only: a bigram detector, not a token detector
DETECTED = (ord("a"), ord("b"))
VARIANT_TOKENS = (ord("t"), ord("T"))
MANY_TOKENS = tuple(range(ord("a"), ord("m") + 1))  # 13 letters: far too many for a detector
PROMOTED = ord("z")                 # the detector's update promotes 'z' and suppresses 'a', 'b'
POS_RANGE = (8, 20)                 # the positional neuron fires at positions 8..19
SIDE_START = 10                     # the one-sided neuron never fires before this position


def _flag(rows: int, on) -> torch.Tensor:
    flag = torch.full((rows,), -5.0)
    flag[list(on)] = 5.0
    return flag


@torch.no_grad()
def planted_opt(n_layers: int = 4, seed: int = 0):
    """OPT with planted neurons in layer 0: dead, token detector ('a', 'b'; its update suppresses
    them and promotes 'z'), variants detector ('t', 'T'), position-range indicator, oscillating,
    one-sided (never before position 10, then on letters a-m), many-token (letters a-m), one
    firing on the start token and 'a', 'b' (the start token must not count as a trigger), and a
    bigram detector ('h' after 't')."""
    model = build("opt", n_layers, seed)
    decoder = model.model.decoder
    emb, pos = decoder.embed_tokens.weight, decoder.embed_positions.weight  # pos row p + 2 is position p
    emb[:, :CONTENT_DIMS] = 0.0
    pos.zero_()  # position reaches layer 0 through the flags alone
    emb[:, TOKEN_DIM] = _flag(VOCAB, DETECTED)
    emb[:, VARIANT_DIM] = _flag(VOCAB, VARIANT_TOKENS)
    emb[:, HALF_DIM] = _flag(VOCAB, MANY_TOKENS)
    emb[:, BOS_DIM] = _flag(VOCAB, [BOS])
    emb[:, T_DIM] = _flag(VOCAB, [ord("t")])
    emb[:, H_DIM] = _flag(VOCAB, [ord("h")])
    positions = torch.arange(pos.shape[0] - 2)
    pos[2:, POS_DIM] = torch.where((positions >= POS_RANGE[0]) & (positions < POS_RANGE[1]), 5.0, -5.0)
    pos[2:, OSC_DIM] = torch.where((positions // 8) % 2 == 0, 5.0, -5.0)
    pos[2:, SIDE_DIM] = torch.where(positions >= SIDE_START, 5.0, -5.0)
    pos[2:, CLOCK_DIMS[0]] = 5.0 * torch.cos(THETA * positions)
    pos[2:, CLOCK_DIMS[1]] = 5.0 * torch.sin(THETA * positions)
    emb[BOS, CONTENT_DIMS:] = 0.0  # unplanted neurons stay silent at position 0, which always holds BOS
    emb[:, N_FLAGS:2 * N_FLAGS] = -emb[:, :N_FLAGS]
    pos[:, N_FLAGS:2 * N_FLAGS] = -pos[:, :N_FLAGS]
    pos[:, CLOCK_DIMS[1] + 1:CLOCK_DIMS[1] + 3] = -pos[:, list(CLOCK_DIMS)]
    layer = decoder.layers[0]
    _previous_token_head(layer.self_attn, scale=float((emb[0] + pos[2]).std(unbiased=False)))
    layer.fc1.weight[:, :CONTENT_DIMS] = 0.0  # unplanted neurons read only the random content dimensions
    fc1 = layer.fc1
    wiring = {DETECTOR: ((TOKEN_DIM,), 0.0), VARIANTS: ((VARIANT_DIM,), 0.0), POSITIONAL: ((POS_DIM,), 0.0),
              OSCILLATING: ((OSC_DIM,), 0.0), ONE_SIDED: ((SIDE_DIM, HALF_DIM), -1.0), MANY: ((HALF_DIM,), 0.0),
              BOS_AND_A: ((BOS_DIM, TOKEN_DIM), 0.5), BIGRAM: ((PREV_DIM, H_DIM), -5.0 / 4.15)}
    for neuron, (dims, bias) in wiring.items():
        fc1.weight[neuron].zero_()
        fc1.weight[neuron, list(dims)] = 1.0
        fc1.bias[neuron] = bias
    fc1.weight[DEAD].zero_()
    fc1.bias[DEAD] = -10.0
    # the detector's update: away from its triggers' unembeddings, toward 'z' (OPT ties lm_head to
    # the embeddings). Those three tokens get distinctive vectors in the dimensions no flag uses,
    # so the update's effect stands out of the random ones; the flags play no part in it.
    gen = torch.Generator().manual_seed(seed)
    for token in (*DETECTED, PROMOTED):
        rest = torch.randn(emb.shape[1] - CONTENT_DIMS, generator=gen)
        emb[token, CONTENT_DIMS:] = 2.0 * rest / rest.norm()
    unembed = emb.clone()
    unembed[:, :CONTENT_DIMS] = 0.0
    direction = 3 * unembed[PROMOTED] - unembed[DETECTED[0]] - unembed[DETECTED[1]]
    layer.fc2.weight[:, DETECTOR] = direction / direction.norm()
    return model


def _previous_token_head(attn, scale: float, gain: float = 200.0) -> None:
    """Head 0 attends from position p to p - 1 (its query is the clock turned back by THETA) and
    writes the flag of the token there, "is it 't'", into PREV_DIM (+5 or -5, mirrored)."""
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
        proj.weight.zero_()
        proj.bias.zero_()
    cos_dim, sin_dim = CLOCK_DIMS
    c, s = torch.cos(torch.tensor(THETA)), torch.sin(torch.tensor(THETA))
    attn.q_proj.weight[0, cos_dim], attn.q_proj.weight[0, sin_dim] = gain * c, gain * s
    attn.q_proj.weight[1, cos_dim], attn.q_proj.weight[1, sin_dim] = -gain * s, gain * c
    attn.k_proj.weight[0, cos_dim] = attn.k_proj.weight[1, sin_dim] = gain
    attn.v_proj.weight[0, T_DIM] = 1.0
    attn.out_proj.weight[PREV_DIM, 0] = scale          # undo the layer norm: +-5 in the residual
    attn.out_proj.weight[PREV_DIM + 1, 0] = -scale


@torch.no_grad()
def degenerate_opt(n_layers: int = 2, seed: int = 0):
    """OPT whose layer 0 is entirely dead but for neuron 0, which fires on every token."""
    model = build("opt", n_layers, seed)
    fc1 = model.model.decoder.layers[0].fc1
    fc1.weight.zero_()
    fc1.bias.fill_(-100.0)
    fc1.bias[0] = 100.0
    return model


# --- NPL: a layer whose activations are an exact linear function of the previous layer's ---------
NPL_PLANTED_LAYER = 2


@torch.no_grad()
def planted_linear_llama(n_layers: int = 4, seed: int = 0, layer: int = NPL_PLANTED_LAYER):
    """Llama whose layer `layer` FFN activation is g_j = g_{j-1}[perm] * scale, exactly.

    Layer j-1 writes nothing to the residual stream from its FFN (down_proj = 0) and layer j's
    attention writes nothing (o_proj = 0), so layer j's FFN reads the very input layer j-1's FFN read
    (same post-attention norm weights). Layer j's gate rows are layer j-1's, permuted, and its up
    rows are layer j-1's, permuted and scaled: act(gate) * up is then layer j-1's g, permuted and
    scaled. Weights are scaled up so that the FFNs and the LM head matter to the perplexity.
    Returns (model, W) with W the planted map: g_j = g_{j-1} @ W."""
    assert 1 <= layer < n_layers
    model = build("llama", n_layers, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for block in model.model.layers:
        block.mlp.gate_proj.weight.mul_(10.0)
        block.mlp.up_proj.weight.mul_(10.0)
        block.mlp.down_proj.weight.mul_(5.0)
        block.self_attn.o_proj.weight.mul_(10.0)
    model.lm_head.weight.mul_(5.0)
    prev, mine = model.model.layers[layer - 1], model.model.layers[layer]
    prev.mlp.down_proj.weight.zero_()
    mine.self_attn.o_proj.weight.zero_()
    mine.post_attention_layernorm.weight.copy_(prev.post_attention_layernorm.weight)
    d_ffn = prev.mlp.gate_proj.weight.shape[0]
    perm = torch.randperm(d_ffn, generator=gen)
    scale = torch.rand(d_ffn, generator=gen) * 1.5 + 0.5
    scale[::2] *= -1
    mine.mlp.gate_proj.weight.copy_(prev.mlp.gate_proj.weight[perm])
    mine.mlp.up_proj.weight.copy_(prev.mlp.up_proj.weight[perm] * scale[:, None])
    W = torch.zeros(d_ffn, d_ffn, dtype=torch.float64)
    W[perm, torch.arange(d_ffn)] = scale.double()
    return model, W.numpy()
