#!/usr/bin/env bash
# The main job on the embedded defaults: build the built-in Rotten Tomatoes index (cached after the
# first run) and compare zero-shot, random-8 and kNN-8 classification with the packaged SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/icl demo "$@"
