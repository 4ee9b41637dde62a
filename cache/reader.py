"""Read a cache lazily: metadata at once, arrays only when asked, one layer at a time. The h5py file
stays inside: callers get arrays, attributes and the typed provenance (cache.provenance)."""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.provenance import Provenance
from ffnscope.cache.state import GramCounts, Sparse
from ffnscope.cache.store import open_file, read_array, read_sparse, read_strings


class CacheReader:
    def __init__(self, path: Path, purpose: str = "reading it"):
        self.path = Path(path)
        self._file = open_file(self.path, purpose)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @cached_property
    def meta(self) -> dict:
        return json.loads(self._file.attrs["meta"])

    @cached_property
    def provenance(self) -> Provenance:
        """The meta dict as typed fields (cache.provenance): what readers should use."""
        return Provenance.from_meta(self.meta)

    @property
    def status(self) -> str:
        return str(self._file.attrs["status"])

    @property
    def shards_done(self) -> int:
        return int(self._file.attrs["shards_done"])

    @cached_property
    def layers(self) -> list[int]:
        return sorted(int(name) for name in self._file["layers"])

    @cached_property
    def n_tokens(self) -> int:
        return int(np.prod(self._file["data/tokens"].shape))

    def array(self, layer: int, name: str, rows=slice(None)) -> np.ndarray:
        """One array of one layer (see cache.schema.LAYER_ARRAYS), or a slice of its rows."""
        return read_array(self._file[schema.layer_group(layer)], name, rows)

    def primary_fire_count(self, layer: int) -> np.ndarray:
        return self.array(layer, "fire_count", self.provenance.recording.primary_index)

    def ngram_counted(self, layer: int) -> np.ndarray | None:
        """Which neurons of a layer have n-gram counts (bool), or None outside the n-gram layers."""
        group = self._file[schema.layer_group(layer)]
        return group["ngram_counted"][:].astype(bool) if "ngram_counted" in group else None

    def unigram(self) -> np.ndarray:
        """The data's token occurrence counts (data/unigram)."""
        return self._file["data/unigram"][:]

    def seq_index(self) -> np.ndarray:
        return self._file["data/seq_index"][:]

    def attrs(self, path: str) -> dict[str, str] | None:
        """The attributes of a group (as stored: JSON text), or None when there is no such group. With
        datasets(), all that cache.analysis_store needs: the reader never hands out its h5py file."""
        group = self._file.get(path)
        return None if group is None else dict(group.attrs)

    def datasets(self, path: str, keys=None) -> dict[str, np.ndarray]:
        """Every dataset under a group (or only `keys` among them), keyed by its path inside the group."""
        group = self._file[path]
        if keys is not None:
            return {key: group[key][()] for key in keys if key in group}
        out: dict[str, np.ndarray] = {}
        group.visititems(lambda key, obj: out.__setitem__(key, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out

    def tokens(self, rows=slice(None)) -> np.ndarray:
        return self._file["data/tokens"][rows]

    def ngrams(self, layer: int, n: int) -> tuple[Sparse, np.ndarray]:
        """(n-gram, neuron) fire counts (and, for tokens, sums of g at those fires) of an n-gram layer,
        and which neurons were counted."""
        group = self._file[schema.layer_group(layer)]
        if "ngram_counted" not in group:
            raise KeyError(f"layer {layer} has no n-gram counts")
        return read_sparse(group[f"ngram{n}"]), group["ngram_counted"][:]

    def gram_counts(self) -> dict[int, GramCounts]:
        """Occurrence counts of the data's bigrams and trigrams."""
        data = self._file["data"]
        return {int(k[4:]): GramCounts(data[k]["gram"][:], data[k]["count"][:]) for k in data if k.startswith("gram")}

    @cached_property
    def vocab(self) -> list[str]:
        return read_strings(self._file, "tokenizer/vocab")
