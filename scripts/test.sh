#!/usr/bin/env bash
# The test suite, slow tests with the real packaged models and the Ray tests included. Extra args go to pytest
# (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
ICL_EXTRAS=dev,ray bash scripts/setup.sh  # Ray too: its tests run here (one local Ray, 2 CPUs)
exec .venv/bin/python -m pytest "$@"
