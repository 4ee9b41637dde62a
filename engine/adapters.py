"""FFN adapters: where each architecture family keeps its decoder layers and FFN neurons.

A neuron is one coordinate of the FFN hidden activation `g`, the input of the FFN output
projection. The firing rule looks at the activation function's output on the neuron's
pre-activation: for plain FFNs that is `g` itself, for gated FFNs (Llama, Gemma) it is
act(gate), and `g = act(gate) * up`.
"""
from __future__ import annotations

from dataclasses import dataclass

from cache.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str          # attribute path of the decoder layer list, from the CausalLM
    mlp: str             # path of the FFN inside one layer ("" when the layer holds it directly)
    act: str             # activation module inside the FFN
    down: str            # output projection inside the FFN; its input is g
    gated: bool          # g = act(gate) * up
    final_norm: str      # final norm before the unembedding (the LM head: get_output_embeddings())
    act_config_key: str  # config attribute naming the activation function
    returns_tuple: bool = False  # decoder layers return (hidden, ...) instead of hidden
    norm_offset: float = 0.0     # Gemma's RMSNorm scales by (1 + weight)
    down_is_conv1d: bool = False  # GPT-2's Conv1D stores weights transposed


FAMILIES: tuple[Family, ...] = (
    Family("OPT", ("opt",), "model.decoder.layers", "", "activation_fn", "fc2", False,
           "model.decoder.final_layer_norm", "activation_function"),
    Family("GPT-2", ("gpt2",), "transformer.h", "mlp", "act", "c_proj", False,
           "transformer.ln_f", "activation_function", down_is_conv1d=True),
    Family("GPT-J", ("gptj",), "transformer.h", "mlp", "act", "fc_out", False,
           "transformer.ln_f", "activation_function", returns_tuple=True),
    Family("GPT-NeoX", ("gpt_neox",), "gpt_neox.layers", "mlp", "act", "dense_4h_to_h", False,
           "gpt_neox.final_layer_norm", "hidden_act"),
    Family("Llama", ("llama", "mistral", "qwen2"), "model.layers", "mlp", "act_fn", "down_proj", True,
           "model.norm", "hidden_act"),
    Family("Gemma", ("gemma", "gemma2"), "model.layers", "mlp", "act_fn", "down_proj", True,
           "model.norm", "hidden_activation", norm_offset=1.0),
)

SUPPORTED = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
RELU_NAMES = {"relu"}


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UserError(f"unsupported architecture '{model_type}'; ffnscope supports {SUPPORTED}")


def _get(obj, path: str):
    for part in filter(None, path.split(".")):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class Adapter:
    """Reads one loaded model through its family's layout."""

    def __init__(self, model):
        self.model = model
        self.family = family_for(model.config.model_type)

    @property
    def layers(self):
        return _get(self.model, self.family.layers)

    @property
    def base(self):
        """The transformer without the LM head (running it computes no logits)."""
        return self.model.base_model

    def mlp(self, layer):
        return _get(layer, self.family.mlp)

    def act_module(self, layer):
        return _get(self.mlp(layer), self.family.act)

    def down_module(self, layer):
        return _get(self.mlp(layer), self.family.down)

    @property
    def activation_name(self) -> str:
        config = self.model.config
        name = getattr(config, self.family.act_config_key, None)
        if name is None and self.family.name == "Gemma":
            name = getattr(config, "hidden_act", None)
        return str(name)

    @property
    def is_relu(self) -> bool:
        return self.activation_name in RELU_NAMES

    @property
    def d_ffn(self) -> int:
        return self.w_out(0).shape[0]

    def w_out(self, index: int):
        """Output rows of layer `index`: (d_ffn, d_model), row i is what neuron i adds per unit of g."""
        weight = self.down_module(self.layers[index]).weight
        return weight if self.family.down_is_conv1d else weight.T

    def final_norm_scale(self):
        """The elementwise scale of the final norm (None where the model has no final norm)."""
        norm = _get(self.model, self.family.final_norm)
        if norm is None or getattr(norm, "weight", None) is None:
            return None
        return norm.weight + self.family.norm_offset

    def unembedding(self):
        """(vocab, d_model) matrix that maps the final hidden state to logits."""
        return self.model.get_output_embeddings().weight  # (GPT-NeoX's head is embed_out or lm_head by version)

    def firing_rule(self, tau: float) -> str:
        site = "act(gate)" if self.family.gated else "act(pre-activation)"
        return f"{self.activation_name}: {site} > {tau:g}"
