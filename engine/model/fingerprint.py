"""A model's fingerprint: what resume, merge, the suppression analysis and the NPL jobs compare to know
that two recordings, or a recording and the model loaded now, are of one model.

It covers the config (less what differs between loads of one model: its path, the transformers version,
the dtype it was loaded in, its quantization settings) and every tensor. For a model read from safetensors
files: each tensor's name, dtype and shape from the file headers, and its bytes read with plain file
reads (no tensor is loaded): whole for a tensor up to FULL_BYTES, else BLOCKS blocks of BLOCK bytes at
evenly spaced offsets, the first and last bytes included. That stays cheap at 66B (64 KiB a large
tensor: about 40 MB read for OPT-66B), but a sampled hash is blind between its blocks: a change confined
to a few elements or rows of a tensor over FULL_BYTES (one edited weight of a large matrix) can go
unseen. A change that touches most of a tensor (fine-tuning, a merge or average of weights, another
checkpoint, another dtype) is seen, and so is any change to a tensor up to FULL_BYTES (every tensor of a
small model). A model only in memory (built in code, a .gguf dequantized whole) is fingerprinted from
all of its tensors' bytes.

Fingerprints start with cache.merge.FINGERPRINT_PREFIX; those of earlier versions (the config and 8
embedding rows) do not, and cannot be compared with these (cache.merge.recorded_before).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ffnscope.cache.errors import UserError
from ffnscope.cache.merge import FINGERPRINT_PREFIX

FULL_BYTES = 4 << 20
BLOCKS, BLOCK = 16, 4 << 10
# config keys that differ between loads of one model
_VOLATILE = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config")


def model_fingerprint(model, files: list[Path] | None = None) -> str:
    """The fingerprint of `model`: from the safetensors `files` its weights are read from, or, without
    them, from the tensors it holds in memory."""
    h = hashlib.sha256()
    config = model.config.to_dict()
    for key in _VOLATILE:
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = [t for file in sorted(set(files)) for t in _file_tensors(file)] if files else _memory_tensors(model)
    for name, digest in sorted(tensors):
        h.update(f"{name}\0".encode() + digest)
    return FINGERPRINT_PREFIX + h.hexdigest()[:16]


def _spans(size: int) -> list[tuple[int, int]]:
    """(offset, length) of a tensor's bytes that are hashed: all of them, or BLOCKS evenly spaced blocks."""
    if size <= FULL_BYTES:
        return [(0, size)]
    return [((size - BLOCK) * i // (BLOCKS - 1), BLOCK) for i in range(BLOCKS)]


def _file_tensors(file: Path) -> list[tuple[str, bytes]]:
    """(name, digest of dtype, shape and hashed bytes) of each tensor of one safetensors file: its header
    (an 8-byte little-endian length, then JSON) says where each tensor's bytes lie after the header."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            out = []
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start, end = (8 + length + offset for offset in entry["data_offsets"])
                digest = hashlib.sha256(f"{entry['dtype']}{entry['shape']}".encode())
                for offset, size in _spans(end - start):
                    digest.update(os.pread(f.fileno(), size, start + offset))
                out.append((name, digest.digest()))
            return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise UserError(f"cannot read the weights in {file} to fingerprint them ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the model's files") from None


def _memory_tensors(model) -> list[tuple[str, bytes]]:
    """(name, digest of dtype, shape and every byte) of each tensor in the model's state dict."""
    import torch

    out = []
    for name, tensor in model.state_dict().items():
        digest = hashlib.sha256(f"{tensor.dtype}{list(tensor.shape)}".encode())
        if tensor.device.type != "meta":  # (a weightless skeleton has no bytes: its files are fingerprinted)
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        out.append((name, digest.digest()))
    return out
