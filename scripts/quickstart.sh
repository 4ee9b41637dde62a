#!/usr/bin/env bash
# Set up and open the explorer on SmolLM2-135M (the default model); the first time, it records
# TOKENS tokens of the built-in corpus as a job, analyzes them and opens the layers when done.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ffnscope tui --start-default --tokens "${TOKENS:-24576}" "$@"
