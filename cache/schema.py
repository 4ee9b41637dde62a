"""Schema v2 of the recording cache: names, versions and the n-gram key encoding.
docs/cache-format.md describes the layout for people; this module is the one place code reads it from."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

FORMAT = "ffnscope-recording"
SCHEMA_VERSION = 2  # v2: top-k ranked by act with g beside it, a start-token slot, unigram g sums
PARTIAL, COMPLETE = "partial", "complete"
ANALYSES = ("dead", "ngrams", "positional", "suppression")  # stored beside the recording, in dependency order
# written by `ffnscope reproduce --into` into the merge of two halves, never by analyze (engine.explore.reproduce)
REPRODUCE = "reproduce"
# the positional analysis's neuron types, stored as 1 + their index (0: not positional)
POSITIONAL_KINDS = ("oscillatory", "both_extremes", "one_extreme", "other")

LAYER_ARRAYS = ("fire_count", "g_sum", "g_sumsq", "g_max", "pos_fire", "topk_value", "topk_index", "topk_g",
                "start_value", "start_index", "start_g")
NGRAM_COLUMNS = ("gram", "neuron", "count", "g_sum")  # g_sum only where an order carries it (G_ORDERS)
# a checkpoint's pos_fire counted since its base, which `pos_fire` names: the two add up (cache.store.read_array)
POS_FIRE_DELTA = "pos_fire_delta"


def layer_group(index: int) -> str:
    return f"layers/{index:03d}"


def encode_grams(windows: np.ndarray, vocab_size: int) -> np.ndarray:
    """(..., n) token ids -> int64 keys, base vocab_size, first token most significant.
    Exact for n <= 3 and vocabularies under two million tokens."""
    import numpy as np  # here, so the CLI reads this module's names without numpy

    key = np.zeros(windows.shape[:-1], np.int64)
    for i in range(windows.shape[-1]):
        key = key * vocab_size + windows[..., i]
    return key


def decode_grams(keys: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """int64 keys -> (len(keys), n) token ids."""
    import numpy as np

    out = np.empty((len(keys), n), np.int64)
    rest = np.asarray(keys, np.int64).copy()
    for i in range(n - 1, -1, -1):
        out[:, i] = rest % vocab_size
        rest //= vocab_size
    return out
