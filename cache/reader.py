"""Read a cache lazily: metadata at once, arrays only when asked, one layer at a time. The h5py file
stays inside: callers get arrays, attributes and the typed provenance (cache.provenance).

Opening checks the meta and the layout (cache.validate, through open_file) and which stored analyses
are damaged; a read that HDF5 fails on later (a damaged chunk) is one line too, never a traceback."""
from __future__ import annotations

from functools import cached_property, wraps
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.errors import UserError
from ffnscope.cache.provenance import Provenance
from ffnscope.cache.state import GramCounts, Sparse
from ffnscope.cache.store import open_file, read_array, read_sparse, read_strings
from ffnscope.cache.validate import FIX, check_analyses, damaged_analysis, parse_meta


def _reading(method):
    """HDF5 failing on a damaged part of the file (a chunk that does not inflate) becomes one line."""
    @wraps(method)
    def read(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as exc:
            first = (str(exc).splitlines() or [""])[0][:160]
            raise UserError(f"{self.path} cannot be read: HDF5 failed on it ({exc.__class__.__name__}: {first}); "
                            f"{FIX}") from None
    return read


class CacheReader:
    def __init__(self, path: Path, purpose: str = "reading it"):
        self.path = Path(path)
        self._file = open_file(self.path, purpose)
        # analyses a view could not use: refused when asked for, recomputed by analyze
        self._damaged = check_analyses(self._file, self.meta)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @cached_property
    def meta(self) -> dict:
        return parse_meta(self._file)  # checked by open_file: cannot fail here

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

    def analysis_damage(self, name: str) -> str | None:
        """What is wrong with the stored analysis `name` (cache.validate), or None when it is usable or absent."""
        return self._damaged.get(name)

    def _refuse_damaged(self, path: str) -> None:
        """One line, instead of a damaged analysis' attributes or datasets."""
        head, _, rest = path.strip("/").partition("/")
        name = rest.split("/")[0]
        if head == "analysis" and name in self._damaged:
            raise damaged_analysis(self.path, name, self._damaged[name])

    @_reading
    def array(self, layer: int, name: str, rows=slice(None)) -> np.ndarray:
        """One array of one layer (see cache.schema.LAYER_ARRAYS), or a slice of its rows."""
        return read_array(self._file[schema.layer_group(layer)], name, rows)

    def primary_fire_count(self, layer: int) -> np.ndarray:
        return self.array(layer, "fire_count", self.provenance.recording.primary_index)

    @_reading
    def ngram_counted(self, layer: int) -> np.ndarray | None:
        """Which neurons of a layer have n-gram counts (bool), or None outside the n-gram layers."""
        group = self._file[schema.layer_group(layer)]
        return group["ngram_counted"][:].astype(bool) if "ngram_counted" in group else None

    @_reading
    def unigram(self) -> np.ndarray:
        """The data's token occurrence counts (data/unigram)."""
        return self._file["data/unigram"][:]

    @_reading
    def seq_index(self) -> np.ndarray:
        return self._file["data/seq_index"][:]

    @_reading
    def attrs(self, path: str) -> dict[str, str] | None:
        """The attributes of a group (as stored: JSON text), or None when there is no such group. With
        datasets(), all that cache.analysis_store needs: the reader never hands out its h5py file."""
        self._refuse_damaged(path)
        group = self._file.get(path)
        return None if group is None else dict(group.attrs)

    @_reading
    def datasets(self, path: str, keys=None) -> dict[str, np.ndarray]:
        """Every dataset under a group (or only `keys` among them), keyed by its path inside the group."""
        self._refuse_damaged(path)
        group = self._file[path]
        if keys is not None:
            return {key: group[key][()] for key in keys if key in group}
        out: dict[str, np.ndarray] = {}
        group.visititems(lambda key, obj: out.__setitem__(key, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out

    @_reading
    def tokens(self, rows=slice(None)) -> np.ndarray:
        tokens = self._file["data/tokens"][rows]
        self._in_range(tokens, self.provenance.model.vocab_size, "data/tokens", "token ids")  # views index vocab
        return tokens

    def _in_range(self, values: np.ndarray, stop: int, where: str, what: str) -> None:
        """Values used as indices (read anyway, so checking costs one pass): in [0, stop), else one line."""
        if values.size and (values.min() < 0 or values.max() >= stop):
            bad = values[(values < 0) | (values >= stop)].reshape(-1)[0]
            raise UserError(f"{self.path} cannot be read: {where} holds {int(bad)}, expected {what} in 0..{stop - 1}; "
                            f"{FIX}")

    @_reading
    def ngrams(self, layer: int, n: int) -> tuple[Sparse, np.ndarray]:
        """(n-gram, neuron) fire counts (and, for tokens, sums of g at those fires) of an n-gram layer,
        and which neurons were counted."""
        group = self._file[schema.layer_group(layer)]
        if "ngram_counted" not in group:
            raise KeyError(f"layer {layer} has no n-gram counts")
        sparse = read_sparse(group[f"ngram{n}"])
        self._in_range(sparse.neuron, self.provenance.model.d_ffn, f"{schema.layer_group(layer)}/ngram{n}/neuron",
                       "neurons")
        return sparse, group["ngram_counted"][:]

    @_reading
    def gram_counts(self) -> dict[int, GramCounts]:
        """Occurrence counts of the data's bigrams and trigrams."""
        data = self._file["data"]
        return {int(k[4:]): GramCounts(data[k]["gram"][:], data[k]["count"][:]) for k in data if k.startswith("gram")}

    @cached_property
    @_reading
    def vocab(self) -> list[str]:
        return read_strings(self._file, "tokenizer/vocab")
