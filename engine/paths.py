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


def unique_paths(paths) -> list[Path]:
    """`paths` in order, each file once however it is spelled (symlinks, relative or absolute)."""
    out, seen = [], set()
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            out.append(Path(path))
    return out


# --- paths ----------------------------------------------------------------------------------------
def recordings_dir() -> Path:
    """Where the TUI puts new recordings: <user cache dir>/recordings (created on demand)."""
    path = user_cache_dir() / "recordings"
    path.mkdir(parents=True, exist_ok=True)
    return path
