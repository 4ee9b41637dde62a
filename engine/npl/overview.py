"""What a recording's NPL sidecar holds, in one read: fitted pairs and their held-out metrics, the
paper's averages, and the stored substitution and functional results. No torch (the CLI's
`npl show` and the TUI's NPL screen)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import NplReader, pair_summary, sidecar_path

SUMMARY_KEYS = ("token_l2", "mse", "fvu", "mean_pearson")


@dataclass
class NplOverview:
    path: Path
    error: str = ""                 # one line: why the sidecar cannot be used (empty when fine or absent)
    meta: dict = field(default_factory=dict)
    pairs: dict[str, dict[tuple[int, int], dict[str, float]]] = field(default_factory=dict)  # method -> pair -> scalars
    summary: dict[str, dict[str, dict]] = field(default_factory=dict)  # method -> key -> group -> mean
    results: dict[str, dict] = field(default_factory=dict)  # substitution / finegrained / functional

    @property
    def exists(self) -> bool:
        return bool(self.meta)

    @property
    def n_layers(self) -> int:
        return int(self.meta.get("model", {}).get("n_layers", 0))


def overview(cache: Path, cache_meta: dict | None = None) -> NplOverview:
    path = sidecar_path(cache)
    out = NplOverview(path)
    if not Path(path).exists():
        return out
    try:
        with NplReader(path) as reader:
            if cache_meta is not None:
                reader.check_cache(cache_meta, cache)
            out.meta = reader.meta
            for method in reader.methods():
                out.pairs[method] = {pair: reader.scalars(*pair, method) for pair in reader.pairs(method)}
                out.summary[method] = {key: pair_summary(reader, method, key) for key in SUMMARY_KEYS}
            for name in reader.results():
                out.results[name] = reader.result(name)
    except UserError as exc:
        out.error, out.meta = str(exc), {}
    return out
