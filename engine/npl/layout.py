"""Which maps to fit and which layers to substitute (numpy only)."""
from __future__ import annotations

import numpy as np

from ffnscope.cache.errors import UserError

PAIRS_HINT = ("write pairs like 'adjacent' (j-1 -> j for every layer), 'grid' or 'grid:K' (every pair of "
              "every K-th layer, forward, backward and self), or '3:4,5:5'")


def grid_layers(n_layers: int, every: int) -> list[int]:
    return list(range(0, n_layers, every))


def parse_pairs(text: str, n_layers: int) -> list[tuple[int, int]]:
    """'adjacent' | 'grid' | 'grid:K' | 'i:j,...' (combinable with commas) -> sorted unique pairs.

    'grid' alone takes every other layer, the paper's setting (every 2k-th layer of LLaMA-2)."""
    pairs: set[tuple[int, int]] = set()
    for piece in filter(None, (p.strip() for p in str(text).split(","))):
        if piece == "adjacent":
            pairs |= {(j - 1, j) for j in range(1, n_layers)}
        elif piece == "grid" or piece.startswith("grid:"):
            try:
                every = int(piece[5:]) if piece != "grid" else 2
            except ValueError:
                raise UserError(f"--pairs '{piece}': K in grid:K must be a whole number; {PAIRS_HINT}") from None
            if every < 1:
                raise UserError(f"--pairs '{piece}': K must be at least 1")
            layers = grid_layers(n_layers, every)
            pairs |= {(i, j) for i in layers for j in layers}
        else:
            source, sep, target = piece.partition(":")
            try:
                i, j = int(source), int(target)
            except ValueError:
                raise UserError(f"--pairs '{piece}' is not a pair; {PAIRS_HINT}") from None
            if not sep or not (0 <= i < n_layers and 0 <= j < n_layers):
                raise UserError(f"--pairs '{piece}' names layers outside 0-{n_layers - 1}; {PAIRS_HINT}")
            pairs.add((i, j))
    if not pairs:
        raise UserError(f"--pairs '{text}' names no pair; {PAIRS_HINT}")
    return sorted(pairs)


def chunks(n_layers: int, n_chunks: int = 4) -> list[list[int]]:
    """The layers in n equal contiguous chunks, shallow to deep (sizes differ by at most one, the
    larger chunks first: 30 layers -> 8, 8, 7, 7)."""
    return [part.tolist() for part in np.array_split(np.arange(n_layers), n_chunks)]


def substituted(chunk: list[int]) -> list[int]:
    """Layers of a chunk that get substituted: layer 0 has no previous layer to predict it from and
    keeps its actual activations (in chunk 1 only layers 1.. are substituted)."""
    return [j for j in chunk if j >= 1]


def parse_chunks(text: str | None, n_chunks: int = 4) -> list[int]:
    """'1-4' / '2,4' -> chunk numbers 1..n."""
    from ffnscope.engine.record.meta import check_ranges, parse_ranges  # the one range parser: no set of 1-10^20

    if text is None:
        return list(range(1, n_chunks + 1))
    ranges = parse_ranges(text, "--chunks", "a chunk list", "1-4 or 2,4")
    return check_ranges(ranges, 1, n_chunks, "--chunks", text, "chunk", "the chunks")
