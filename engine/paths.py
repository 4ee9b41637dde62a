"""Where ffnscope keeps converted models and default recordings."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """$FFNSCOPE_CACHE_DIR, else $XDG_CACHE_HOME/ffnscope, else ~/.cache/ffnscope."""
    if os.environ.get("FFNSCOPE_CACHE_DIR"):
        return Path(os.environ["FFNSCOPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ffnscope"
