"""Hook points on a layer's FFN (TransformerLens-style): where in the FFN (the site) apart from what is
done there (the callback). Recording reads g and act(gate) through FFNProbe; NPL reads g and may
substitute it (engine.npl.capture.GCapture). Both go through ffn_hooks.

Sites (engine.model.sites names the modules):
  g   - the input of the FFN output projection; a callback that returns a tensor replaces g there
  act - the output of the activation module, act(gate) in a gated FFN (absent where the activation
        is not a module)
  up  - the output of the up projection (the fused gate_up projection where there is no separate up)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from ffnscope.cache.errors import UserError
from ffnscope.engine.model.sites import Adapter

# at(layer index, tensor at the site) -> for site g, a tensor to use instead, or None to keep g;
# what act and up callbacks return is ignored (they read only)
At = Callable[[int, torch.Tensor], "torch.Tensor | None"]
SITES = ("g", "act", "up")


def site_module(adapter: Adapter, layer: nn.Module, site: str) -> nn.Module | None:
    if site == "g":
        return adapter.down_module(layer)
    if site == "act":
        return adapter.act_module(layer)
    if site == "up":
        return adapter.up_module(layer) if adapter.layout.up else adapter.gate_module(layer)
    raise ValueError(f"unknown FFN site {site!r}; one of {SITES}")


@contextmanager
def ffn_hooks(adapter: Adapter, layers: Iterable[int], **at: At):
    """Call at[site](k, tensor) at each given site of the FFN of every layer k in `layers` while the
    block runs (hooks removed on exit). Tensors are (B, T, width): OPT runs its FFN on flat (B*T, width)
    rows, which are shaped back from the layer's own input (a replacement is flattened again)."""
    shapes: dict[int, tuple[int, ...]] = {}  # (B, T) of the hidden state each layer was last given

    def on_layer(k):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None:
                shapes[k] = tuple(hidden.shape[:-1])
        return hook

    def unflat(k, t: torch.Tensor) -> torch.Tensor:
        bt = shapes.get(k)
        return t.reshape(*bt, t.shape[-1]) if t.dim() == 2 and bt is not None and len(bt) == 2 else t

    def on_g(k, fn):
        def hook(_module, args):
            new = fn(k, unflat(k, args[0]))
            if new is None:
                return None
            return (new.reshape(args[0].shape), *args[1:])
        return hook

    def on_output(k, fn):
        def hook(_module, _args, output):
            fn(k, unflat(k, output))
        return hook

    handles = []
    try:
        for k in sorted(set(layers)):
            layer = adapter.layers[k]
            handles.append(layer.register_forward_pre_hook(on_layer(k), with_kwargs=True))
            for site, fn in at.items():
                module = site_module(adapter, layer, site)
                if module is None:
                    continue
                handles.append(module.register_forward_pre_hook(on_g(k, fn)) if site == "g"
                               else module.register_forward_hook(on_output(k, fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class FFNProbe:
    """Catches a layer's FFN hidden activation g and, for gated FFNs, act(gate) during its forward.

    The first time it is attached it also checks the roles the locator found against what the FFN
    computes: g must equal act(gate) * up (gated) or the activation's output (plain). A layout the
    locator got wrong is refused there, before anything is recorded."""
    CHECK_ROWS = 64  # token rows the check compares

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.g: torch.Tensor | None = None
        self.act: torch.Tensor | None = None
        self._up: torch.Tensor | None = None
        self.checked = False

    def _keep(self, name: str) -> At:
        def keep(_k, t):
            setattr(self, name, t)
        return keep

    @contextmanager
    def attached(self, index: int):
        """Hooks on layer `index`'s FFN while the block runs; take() after each batch."""
        check = not self.checked
        sites = {"g": self._keep("g")}
        if self.adapter.gated or check:
            sites["act"] = self._keep("act")
        if check and self.adapter.gated:
            sites["up"] = self._keep("_up")
        with ffn_hooks(self.adapter, [index], **sites):
            yield self

    def _check(self) -> None:
        g, act, up = self.g, self.act, self._up
        self.checked = True
        self._up = None
        layout = self.adapter.layout
        if act is None:
            return  # a plain FFN whose activation is not a module: g is what fires, nothing to compare
        if self.adapter.gated:
            halves = up.chunk(2, dim=-1) if layout.fused else (up,)
            rows = slice(0, self.CHECK_ROWS)  # a wrong role differs everywhere: a few rows tell, cheaply
            ok = any(h.shape == g.shape and torch.allclose(act[..., rows, :] * h[..., rows, :], g[..., rows, :],
                                                           rtol=1e-3, atol=1e-5) for h in halves)
            what = f"act({layout.gate}) * {layout.up or 'its other half'}"
        else:
            ok = act.shape == g.shape and torch.equal(act, g)
            what = f"the output of {layout.act}"
        if not ok:
            raise UserError(f"cannot record {self.adapter.name}: the input of its FFN output projection "
                            f"'{layout.down}' is not {what}, so its neurons cannot be read as located")

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (g, firing input), both (tokens, d_ffn); the second is g itself for plain FFNs."""
        if not self.checked:
            self._check()
        g = self.g.reshape(-1, self.g.shape[-1])
        act = g if not self.adapter.gated else self.act.reshape(-1, self.act.shape[-1])
        self.g = self.act = None
        return g, act
