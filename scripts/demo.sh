#!/usr/bin/env bash
# The main job on the embedded defaults: an index over 1,000 built-in Rotten Tomatoes training
# reviews and kNN prompting's anchors over them (both kept for the next run), then zero-shot, kNN-8
# ICL, the anchors' linear readout and kNN-8 mixed with the readout on 100 test reviews, with the
# packaged SmolLM2 (`icl demo --help`: --pool, --n, --k).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/icl demo "$@"
