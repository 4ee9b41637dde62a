#!/usr/bin/env bash
# Set up, record SmolLM2-135M (the default model) on the built-in corpus, print the per-layer table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ffnscope record --model default --data builtin --tokens "${TOKENS:-65536}" \
  --out "${OUT:-smollm2-default.h5}" --force "$@"
