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
TOKEN_DIM, POS_DIM = 0, 1          # residual dimensions the planted neurons read
DEAD, DETECTOR, POSITIONAL = 3, 5, 7  # neuron indices in layer 0
DETECTED = (ord("a"), ord("b"))
POS_RANGE = (8, 20)                # the positional neuron fires at positions 8..19


@torch.no_grad()
def planted_opt(n_layers: int = 4, seed: int = 0):
    """OPT whose layer 0 sees only token + position embeddings (its attention writes nothing), with
    a dead neuron, a neuron that fires exactly on tokens 'a' and 'b', and one that fires exactly at
    positions 8-19, whatever the text."""
    model = build("opt", n_layers, seed)
    decoder = model.model.decoder
    emb = decoder.embed_tokens.weight
    emb[:, TOKEN_DIM] = -5.0
    emb[list(DETECTED), TOKEN_DIM] = 5.0
    emb[:, POS_DIM] = 0.0
    pos = decoder.embed_positions.weight          # row p + 2 embeds position p
    pos[:, TOKEN_DIM] = 0.0
    pos[:, POS_DIM] = -5.0
    pos[POS_RANGE[0] + 2: POS_RANGE[1] + 2, POS_DIM] = 5.0
    layer = decoder.layers[0]
    layer.self_attn.out_proj.weight.zero_()
    layer.self_attn.out_proj.bias.zero_()
    fc1 = layer.fc1
    for neuron, dim in ((DETECTOR, TOKEN_DIM), (POSITIONAL, POS_DIM)):
        fc1.weight[neuron].zero_()
        fc1.weight[neuron, dim] = 1.0
        fc1.bias[neuron] = 0.0
    fc1.weight[DEAD].zero_()
    fc1.bias[DEAD] = -10.0
    return model
