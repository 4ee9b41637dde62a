"""The FFN locator: where any Hugging Face causal LM keeps its decoder layers and FFN neurons.

A neuron is one coordinate of the FFN hidden activation `g`, the input of the FFN output
projection. The firing rule looks at the activation function's output on the neuron's
pre-activation: for plain FFNs that is `g` itself, for gated FFNs (SwiGLU/GeGLU) it is act(gate),
and `g = act(gate) * up`.

Nothing here is keyed by architecture name. The locator reads the module tree: the decoder layer
list (the ModuleList of num_hidden_layers identical blocks), in a block the FFN's output
projection (down_proj, fc2, c_proj, dense_4h_to_h, w2, fc_out, ...) outside the attention, beside
it the input projection(s) (gate/up, w1/w3, fc1, c_fc, fused gate_up) and the activation module,
then the final norm (and whether it scales by 1 + w, found by running a copy of it) and the
unembedding. It works on a skeleton on the meta device, so an architecture is accepted or refused
before any weight is read. What cannot be located is refused with the reason (mixture-of-experts
FFNs, hybrid stacks, blocks without a dense FFN). The recorder checks the located roles on the
first batch it runs (engine.model.hooks.FFNProbe), so a wrong guess fails loudly, never silently.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ffnscope.cache.errors import UserError

DOWN_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "fc_out", "wo", "out_proj", "down")
GATE_NAMES = ("gate_proj", "w1", "wi_0", "gate", "linear_gate")
UP_NAMES = ("up_proj", "w3", "wi_1", "fc1", "c_fc", "dense_h_to_4h", "fc_in", "wi", "up", "linear_in")
FUSED_NAMES = ("gate_up_proj", "gate_up", "w13", "fc1_gate_up")
NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "ln_out")
ATTENTION_WORDS = ("attn", "attention", "mixer", "self_attn", "cross")
MOE_WORDS = ("experts", "moe", "router")
ACT_CONFIG_KEYS = ("hidden_act", "afn", "hidden_activation", "activation_function", "hidden_activation_fn",
                   "ffn_act", "act_fn", "activation")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# True exceptions, keyed by model_type: none needed for the architectures the sweep accepts today.
OVERRIDES: dict[str, dict] = {}


def _get(obj, path: str):
    for part in filter(None, path.split(".")):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _is_activation(module: nn.Module) -> bool:
    """A parameter-free module that is an activation function (not dropout, identity or a norm)."""
    if any(True for _ in module.parameters(recurse=True)) or isinstance(module, (nn.Dropout, nn.Identity)):
        return False
    name = type(module).__name__.lower()
    return (type(module).__module__.startswith(("torch.nn.modules.activation", "transformers.activations"))
            or any(w in name for w in ("gelu", "silu", "swish", "relu", "act", "tanh", "sigmoid", "mish")))


def _n_layers(config) -> int | None:
    for key in LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class FFNLayout:
    """Paths found by the locator (from the CausalLM, or inside one decoder block)."""
    layers: str             # the decoder layer list
    mlp: str                # the FFN inside a block ("" when the block holds it directly, as OPT)
    down: str               # output projection inside the FFN; its input is g
    act: str | None         # activation module inside the FFN
    gate: str | None        # gate projection of a gated FFN (or the fused gate+up projection)
    up: str | None          # up projection (None for a fused gate+up)
    fused: bool             # gate and up come out of one projection, gate first
    down_transposed: bool   # GPT-2's Conv1D stores weights as (in, out)
    final_norm: str | None  # final norm before the unembedding
    d_ffn: int

    @property
    def gated(self) -> bool:
        return self.gate is not None


def refuse(model_type: str, reason: str) -> UserError:
    return UserError(f"cannot record '{model_type}': {reason}; ffnscope records dense FFN neurons of decoder-only "
                     "causal LMs (see docs/architectures.md for the ones a sweep checks)")


def _find_layers(model: nn.Module, n: int | None, model_type: str) -> tuple[str, nn.ModuleList]:
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (n is None or len(module) == n):
            if any(w in path.lower() for w in ("encoder", "vision", "audio", "mtp")):
                continue
            candidates.append((path, module))
    if not candidates:
        raise refuse(model_type, f"no list of {n or 'its'} decoder layers found in the module tree")
    # the decoder stack is the list with the most parameters (not a list of norms or heads)
    path, layers = max(candidates, key=lambda pm: (sum(p.numel() for p in pm[1].parameters()), -len(pm[0])))
    kinds = {type(layer).__name__ for layer in layers}
    if len(kinds) > 1:
        raise refuse(model_type, f"its layers are of {len(kinds)} kinds ({', '.join(sorted(kinds))}): a hybrid stack")
    return path, layers


def _find_ffn(block: nn.Module, model_type: str) -> dict:
    """Roles of one decoder block's FFN, by name and shape."""
    named = dict(block.named_modules())
    if any(w in path.lower().split(".")[-1] for path in named for w in MOE_WORDS if path):
        raise refuse(model_type, "its FFN is a mixture of experts (a router picks experts per token), which has "
                                 "no fixed set of neurons per token")
    downs = []
    for path, module in named.items():
        last = path.split(".")[-1]
        if last in DOWN_NAMES and _weight_shape(module) is not None:
            if any(w in part.lower() for part in path.split(".")[:-1] for w in ATTENTION_WORDS):
                continue
            downs.append(path)
    if not downs:
        raise refuse(model_type, "no FFN output projection found in a decoder layer (no dense FFN)")
    down = min(downs, key=lambda p: (p.count("."), DOWN_NAMES.index(p.split(".")[-1])))
    mlp = down.rpartition(".")[0]
    ffn = named[mlp] if mlp else block
    children = dict(ffn.named_children())
    down_module = children[down.split(".")[-1]]
    shape = _weight_shape(down_module)
    transposed = type(down_module).__name__ == "Conv1D"
    d_ffn = shape[0] if transposed else shape[1]

    def first(names, want_rows=None):
        for name in names:
            module = children.get(name)
            s = _weight_shape(module) if module is not None else None
            if s is None:
                continue
            rows = s[1] if type(module).__name__ == "Conv1D" else s[0]
            if want_rows is None or rows == want_rows:
                return name
        return None

    gate = up = None
    fused = False
    if first(FUSED_NAMES, 2 * d_ffn):
        gate, fused = first(FUSED_NAMES, 2 * d_ffn), True
    elif first(GATE_NAMES, d_ffn) and first(UP_NAMES, d_ffn):
        gate, up = first(GATE_NAMES, d_ffn), first(UP_NAMES, d_ffn)
    elif first(UP_NAMES, 2 * d_ffn):  # one input projection twice as wide: a fused GLU
        gate, fused = first(UP_NAMES, 2 * d_ffn), True
    elif not first(UP_NAMES, d_ffn) and not first(GATE_NAMES, d_ffn):
        raise refuse(model_type, f"no FFN input projection of width {d_ffn} beside '{down}'")
    acts = [name for name, module in children.items() if _is_activation(module)]
    # a per-neuron scale or norm beside the roles (BitNet's ffn_sub_norm) acts between the neurons and the
    # output projection: g would not be act(gate) x up, so the neurons read would not be the ones projected
    roles = {gate, up, down.split(".")[-1], *acts}
    between = [name for name, module in children.items() if name not in roles and list(module.parameters())
               and all(tuple(p.shape) == (d_ffn,) for p in module.parameters())]
    if between:
        raise refuse(model_type, f"its FFN transforms the neurons before the output projection ('{between[0]}' "
                                 f"of width {d_ffn}), so the input of '{down}' is not act(gate) x up")
    if gate is not None and not acts:
        raise refuse(model_type, "its gated FFN applies the activation as a function, not a module, so act(gate) "
                                 "cannot be read")
    return dict(mlp=mlp, down=down.split(".")[-1], act=acts[0] if acts else None,
                gate=gate, up=up, fused=fused, down_transposed=transposed, d_ffn=d_ffn)


def locate(model: nn.Module) -> FFNLayout:
    """Find the FFN layout of a causal LM (real or on the meta device), or raise a UserError why not."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type in OVERRIDES:
        return FFNLayout(**OVERRIDES[model_type])
    if model.get_output_embeddings() is None:
        raise refuse(model_type, "it has no LM head (unembedding)")
    layers_path, layers = _find_layers(model, _n_layers(config), model_type)
    roles = [_find_ffn(block, model_type) for block in layers]
    widths = {r["d_ffn"] for r in roles}
    if len(widths) > 1:
        raise refuse(model_type, f"its layers have FFNs of different widths ({', '.join(map(str, sorted(widths)))})")
    shape = roles[0]
    if any(r != shape for r in roles[1:]):
        raise refuse(model_type, "its layers lay out their FFNs differently")
    holder = _get(model, layers_path.rpartition(".")[0])
    norm = next((name for name in NORM_NAMES if isinstance(getattr(holder, name, None), nn.Module)), None)
    norm_path = f"{layers_path.rpartition('.')[0]}.{norm}" if norm else None
    return FFNLayout(layers=layers_path, final_norm=norm_path, **shape)


def norm_offset(norm: nn.Module) -> float:
    """1.0 for norms that scale by (1 + weight), as Gemma's, else 0.0: found by running a copy with
    every parameter zeroed (a 1 + w norm then still passes its normalized input through)."""
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    with torch.no_grad():
        for p in probe.parameters():
            p.zero_()
        width = next((p.shape[-1] for p in norm.parameters()), None)
        if width is None:
            return 0.0
        out = probe(torch.randn(2, width, generator=torch.Generator().manual_seed(0)))
    out = out[0] if isinstance(out, tuple) else out
    return 1.0 if out.abs().max().item() > 1e-3 else 0.0


def _activation_name(config, act: nn.Module | None) -> str:
    for key in ACT_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, str):
            return value
    return type(act).__name__ if act is not None else "unknown"


def zero_below_zero(act: nn.Module | None) -> bool:
    """Whether the activation is exactly 0 on every negative input (ReLU, squared ReLU): then tau 0
    is the paper's "non-zero" rule exactly."""
    if act is None:
        return False
    with torch.no_grad():
        out = act(torch.linspace(-8.0, -1e-3, 64))
    return bool((out == 0).all())


def architecture_name(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix in ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "Model"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class Adapter:
    """Reads one loaded model through the layout the locator found."""

    def __init__(self, model, layout: FFNLayout | None = None):
        self.model = model
        self.layout = layout or locate(model)
        self.weights = None  # engine.model.weights.LayerWeights when decoder layers are read from the files
        self.name = architecture_name(model)
        self.gated = self.layout.gated
        act = self.act_module(self.layers[0]) if self.layout.act else None
        self.activation_name = _activation_name(model.config, act)
        self.is_relu = zero_below_zero(act) if act is not None else self.activation_name in ("relu", "relu2")
        norm = self.final_norm
        self.norm_offset = norm_offset(norm) if norm is not None and any(True for _ in norm.parameters()) else 0.0

    @property
    def layers(self):
        return _get(self.model, self.layout.layers)

    @property
    def base(self):
        """The transformer without the LM head (running it computes no logits)."""
        return self.model.base_model

    @property
    def final_norm(self) -> nn.Module | None:
        return _get(self.model, self.layout.final_norm) if self.layout.final_norm else None

    @property
    def layers_holder(self) -> nn.Module:
        """The module holding the layer list and the final norm (OPT's decoder, Llama's model)."""
        return _get(self.model, self.layout.layers.rpartition(".")[0])

    def mlp(self, layer):
        return _get(layer, self.layout.mlp)

    def act_module(self, layer):
        return _get(self.mlp(layer), self.layout.act) if self.layout.act else None

    def down_module(self, layer):
        return _get(self.mlp(layer), self.layout.down)

    def gate_module(self, layer):
        return _get(self.mlp(layer), self.layout.gate) if self.layout.gate else None

    def up_module(self, layer):
        return _get(self.mlp(layer), self.layout.up) if self.layout.up else None

    @property
    def d_ffn(self) -> int:
        return self.layout.d_ffn

    def w_out(self, index: int):
        """Output rows of layer `index`: (d_ffn, d_model), row i is what neuron i adds per unit of g."""
        weight = self.down_module(self.layers[index]).weight
        if weight.is_meta and self.weights is not None:  # the layer is still in the files: read this one matrix
            inside = ".".join(filter(None, (self.layout.mlp, self.layout.down, "weight")))
            weight = self.weights.tensor(f"{self.layout.layers}.{index}.{inside}")
        return weight if self.layout.down_transposed else weight.T

    def final_norm_scale(self):
        """The elementwise scale of the final norm (None where the model has no final norm)."""
        norm = self.final_norm
        if norm is None or getattr(norm, "weight", None) is None:
            return None
        return norm.weight + self.norm_offset

    def unembedding(self):
        """(vocab, d_model) matrix that maps the final hidden state to logits."""
        return self.model.get_output_embeddings().weight

    def firing_rule(self, tau: float) -> str:
        site = "act(gate)" if self.gated else "act(pre-activation)"
        return f"{self.activation_name}: {site} > {tau:g}"
