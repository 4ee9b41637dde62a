"""ffnscope: record how every FFN neuron of a causal LM fires, and run the analyses of Voita et al.
(2023) and the Neuron Predictability Lens on the recording.

The distribution installs one namespace: `ffnscope.app` (CLI and terminal app), `ffnscope.engine`
(models, recording, analyses, jobs) and `ffnscope.cache` (the HDF5 store). In the repository they are
the top-level folders app/, engine/ and cache/; pyproject.toml maps them here. `python -m ffnscope`
is the command line (what jobs run).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ffnscope")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["open_recording", "record", "analyze", "Recording", "__version__"]


def __getattr__(name):  # the API loads on first use: `import ffnscope` stays light
    if name in ("open_recording", "record", "analyze", "Recording"):
        from ffnscope import api

        return getattr(api, name)
    raise AttributeError(f"module 'ffnscope' has no attribute {name!r}")
