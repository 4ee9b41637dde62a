import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _isolated_user_cache(tmp_path_factory, monkeypatch):
    """Converted models and default recordings go to a throwaway directory, never ~/.cache."""
    monkeypatch.setenv("FFNSCOPE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "user-cache"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """Plain English-ish text, about 40k bytes, with plenty of 'a' and 'b'."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    words = ("the cat sat on a mat by the bank of a big blue river and all was fine "
             "before breakfast but after lunch a storm came over the hills ").split()
    import random

    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(words) for _ in range(8000)))
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """family -> saved tiny random model directory (built once per session)."""
    from tests.tiny_models import CONFIGS, tiny_model_dir

    base = tmp_path_factory.mktemp("models")
    return {mt: tiny_model_dir(base / mt, mt) for mt in CONFIGS}


@pytest.fixture(scope="session")
def hostile_cache(tmp_path_factory, text_file) -> Path:
    """A planted, analyzed recording whose detector triggers are hostile strings (tests.helpers)."""
    from tests.helpers import hostile_recording

    return hostile_recording(tmp_path_factory.mktemp("hostile"), text_file)


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
