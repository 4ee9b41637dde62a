"""Seconds of device work in named buckets (engine.npl.substitute's `seconds`)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ffnscope.engine.model import accelerator


@dataclass
class Span:
    """One timed block: `seconds` it counts in its bucket, set when it ends; `inner` the blocks inside it took."""
    seconds: float = 0.0
    inner: float = 0.0


class DeviceTimer:
    """Wall-clock seconds in named buckets, `with timer("name"):`. A block ends at a device synchronize, so a GPU's
    queued work counts in the block that queued it. A block inside another counts in its own bucket only: the
    outer block's bucket gets the outer time less the inner blocks' (work done inside a pass, timed apart)."""

    def __init__(self, device, buckets):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = dict.fromkeys(buckets, 0.0)
        self._open: list[Span] = []

    @contextmanager
    def __call__(self, bucket: str) -> Iterator[Span]:
        span = Span()
        outer = self._open[-1] if self._open else None
        self._open.append(span)
        began = time.perf_counter()
        try:
            yield span
        finally:
            self._open.pop()
        accelerator.synchronize(self.device)  # not reached on an exception: a failed block is not timed
        elapsed = time.perf_counter() - began
        span.seconds = elapsed - span.inner
        self.seconds[bucket] += span.seconds
        if outer is not None:
            outer.inner += elapsed
