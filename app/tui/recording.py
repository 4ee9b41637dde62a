"""An opened recording: its reader and neuron index, loaded once and shared by the screens."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from ffnscope.app.safe_text import printable
from ffnscope.cache.npl_store import sidecar_path
from ffnscope.cache.reader import CacheReader
from ffnscope.engine.analysis.dead import rule_short
from ffnscope.engine.explore.index import NeuronIndex


class OpenRecording:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.mtime = self._mtimes()
        self.reader = CacheReader(self.path, "opening it")
        self.index = NeuronIndex(self.reader)
        self._warming: threading.Thread | None = None
        self.meta = self.reader.meta
        self.prov = self.reader.provenance
        self.status = self.reader.status
        self.n_tokens = self.reader.n_tokens

    def warm_up(self) -> None:
        """Once the neurons screen is up: read in the background what the first sort by an activation
        statistic or trigger search would wait for (started sooner, it would slow the opening)."""
        if self._warming is None:
            self._warming = threading.Thread(target=self.index.warm, name=f"warm {self.path.name}", daemon=True)
            self._warming.start()

    def _mtimes(self) -> tuple:
        """The cache's and its NPL sidecar's modification times (jobs replace them whole)."""
        out = []
        for path in (self.path, sidecar_path(self.path)):
            try:
                out.append(os.stat(path).st_mtime_ns)
            except OSError:
                out.append(None)
        return tuple(out)

    @property
    def stale(self) -> bool:
        """True when a job has replaced the cache or its NPL sidecar since it was opened."""
        now = self._mtimes()
        return now[0] is not None and now != self.mtime

    @property
    def analyzed(self) -> bool:
        return all(self.index.analyses.values())

    @property
    def name(self) -> str:
        """The file's name as shown (escaped: a name can hold terminal escapes)."""
        return printable(self.path.name)

    @property
    def model_name(self) -> str:
        return printable(self.prov.model.label)  # with a dequantized GGUF's quantization

    def title(self) -> str:
        """The one-line header: what is open."""
        rec = self.prov.recording
        tau = f"tau {rec.primary_tau:g}" if not rec.is_relative else rule_short(rec)
        return f"{self.model_name} · {_tokens(self.n_tokens)} tok · {tau} · seq {self.prov.data.seq_len}"

    def close(self) -> None:
        self.reader.close()


def _tokens(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1_000_000 else f"{n / 1e3:.0f}k" if n >= 10_000 else str(n)
