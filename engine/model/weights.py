"""A model's weights read from its safetensors files by tensor name, one decoder layer at a time.

load.py builds the model as a skeleton whose parameters live on the meta device (buffers are real:
rotary tables and masks are computed from the config). `LayerWeights` maps every skeleton tensor to its
name in the files, loads the non-layer weights (embeddings, final norm, head) once, and reads a decoder
layer when it is needed: into the layer for good (a resident layer), as a dict for torch.func
(a streamed layer), or for the duration of one forward call (anyone calling the model directly).
Each read opens the file and closes it after: an open safetensors file is a memory map, and every page
read through it would count in the process's resident memory until it is closed.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ffnscope.engine.model import accelerator


class Unmappable(Exception):
    """A skeleton weight has no tensor in the files under any name we try: load the model eagerly."""


def weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    from safetensors import safe_open

    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            found.update(dict.fromkeys(handle.keys(), file))
    return found


def read_tensors(names: dict[str, str], files: dict[str, Path], dtypes: dict[str, torch.dtype],
                 device: torch.device | str = "cpu", pin: bool = False) -> dict[str, torch.Tensor]:
    """{key: tensor} for names {key: name in the files}, each cast to dtypes[key] (as from_pretrained casts);
    pin: into page-locked host memory (for an asynchronous copy to a GPU), `device` ignored."""
    from safetensors import safe_open

    by_file = defaultdict(list)
    for key, name in names.items():
        by_file[files[name]].append(key)
    out = {}
    for file, keys in by_file.items():
        with safe_open(str(file), "pt") as handle:
            for key in keys:
                # the tensor read is a view of the memory map: always copy it (casting or not), so closing
                # the file leaves no mapped page behind and nothing written to a weight reaches the map
                src = handle.get_tensor(names[key])
                if pin:
                    out[key] = accelerator.runtime.pinned_empty(src.shape, dtypes[key]).copy_(src)
                else:
                    out[key] = src.to(device=device, dtype=dtypes[key], copy=True)
    return out


def _renamed(model: nn.Module, names) -> dict[str, str]:
    """model key -> file name for the names transformers renames when it loads (GPT-NeoX's embed_out is
    lm_head). A name a real conversion (fusing, splitting) applies to is left out: its key stays unmapped."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - another transformers: plain names only
        return {}
    out = {}
    for name in names:
        key = name
        for transform in transforms:
            new, matched = transform.rename_source_key(key)
            if matched is not None:
                key = new if isinstance(transform, WeightRenaming) else None
                if key is None:
                    break
        if key is not None and key != name:
            out[key] = name
    return out


def unfiled_buffers(layer: nn.Module, keys) -> dict[str, torch.Tensor]:
    """The layer's buffers not among `keys` (what a read from the files or a state_dict brings): those computed
    from the config and kept out of the state_dict (persistent=False), as GPT-Neo's and GPT-1's causal masks.
    The skeleton holds them on the CPU; a layer run elsewhere needs them where it runs."""
    return {name: buffer for name, buffer in layer.named_buffers() if name not in keys and not buffer.is_meta}


def _assign(root: nn.Module, key: str, tensor: torch.Tensor) -> None:
    path, _, attr = key.rpartition(".")
    module = root.get_submodule(path)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


class LayerWeights:
    """The file names and dtypes of a skeleton's tensors; loads non-layer weights and decoder layers."""

    def __init__(self, model: nn.Module, directory: Path, layers_path: str):
        self.model = model
        self.files = weight_files(directory)
        self.layers_path = layers_path
        model.tie_weights()  # a skeleton built from the config alone shares no tensor yet (lm_head and embeddings)
        state = model.state_dict(keep_vars=True)
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.names: dict[str, str] = {}
        renamed = _renamed(model, self.files)
        self.dtypes = {key: tensor.dtype for key, tensor in state.items()}
        by_tensor = {}
        for key, tensor in state.items():
            name = renamed.get(key) or self._file_name(key, prefix)
            if name is not None:
                self.names[key] = name
                by_tensor.setdefault(id(tensor), key)
        for key, tensor in state.items():  # a weight without its own tensor must be tied to one that has
            if key not in self.names and isinstance(tensor, nn.Parameter) and id(tensor) not in by_tensor:
                raise Unmappable(key)
        n = len(self.layers)
        self.layer_names = [{} for _ in range(n)]  # per layer: key inside the layer -> name in the files
        head = f"{layers_path}."
        for key, name in self.names.items():
            if key.startswith(head):
                index, _, inner = key[len(head):].partition(".")
                if index.isdigit() and int(index) < n:
                    self.layer_names[int(index)][inner] = name
        self._borrowed: set[int] = set()
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._borrow_hook(index))
            layer.register_forward_hook(self._return_hook(index), always_call=True)

    def _file_name(self, key: str, prefix: str) -> str | None:
        tries = [key]
        if prefix:
            tries += [key[len(prefix) + 1:]] if key.startswith(prefix + ".") else [f"{prefix}.{key}"]
        return next((name for name in tries if name in self.files), None)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    def load_static(self) -> None:
        """Read every weight outside the decoder layers into the model (once), then re-tie shared ones."""
        head = f"{self.layers_path}."
        names = {k: v for k, v in self.names.items() if not k.startswith(head)}
        for key, tensor in read_tensors(names, self.files, self.dtypes).items():
            _assign(self.model, key, tensor)
        self.model.tie_weights()
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            if not key.startswith(head) and tensor.is_meta:
                raise Unmappable(key)

    def is_loaded(self, index: int) -> bool:
        return not any(p.is_meta for p in self.layers[index].parameters())

    def read(self, index: int, device: torch.device | str = "cpu", pin: bool = False) -> dict[str, torch.Tensor]:
        """Layer `index`'s weights from the files, keyed as in its state_dict, for torch.func.functional_call
        (pin: into page-locked host memory, see read_tensors)."""
        head = f"{self.layers_path}.{index}."
        return read_tensors(self.layer_names[index], self.files,
                            {k: self.dtypes[head + k] for k in self.layer_names[index]}, device, pin)

    def load(self, index: int, device: torch.device | str = "cpu") -> None:
        """Read layer `index` into its module (it stays until release), its buffers that no file holds moved
        to `device` too (they are computed from the config: GPT-Neo's causal mask, non-persistent)."""
        layer = self.layers[index]
        for key, tensor in {**unfiled_buffers(layer, self.layer_names[index]), **self.read(index, device)}.items():
            _assign(layer, key, tensor.to(device))

    def release(self, index: int) -> None:
        """Put layer `index`'s file-backed weights back on the meta device."""
        layer = self.layers[index]
        for key in self.layer_names[index]:
            path, _, attr = key.rpartition(".")
            module = layer.get_submodule(path)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(module._parameters[attr].to("meta"), requires_grad=False)
            else:
                module._buffers[attr] = module._buffers[attr].to("meta")

    def tensor(self, key: str) -> torch.Tensor:
        """One weight by its state_dict key, read from the files (for a layer that is not loaded)."""
        return read_tensors({key: self.names[key]}, self.files, self.dtypes)[key]

    # a direct call of the model (not through the runner, whose streamed layers bring their weights)
    # borrows each unloaded layer's weights for the call and gives them back after it
    def _borrow_hook(self, index: int):
        def hook(_module, args):
            if not self.is_loaded(index):
                hidden = args[0] if args else None
                self.load(index, hidden.device if isinstance(hidden, torch.Tensor) else "cpu")
                self._borrowed.add(index)
        return hook

    def _return_hook(self, index: int):
        def hook(_module, _args, _output):
            if index in self._borrowed:
                self._borrowed.discard(index)
                self.release(index)
        return hook
