#!/usr/bin/env bash
# The test suite, slow tests with the real packaged models included. Extra args go to pytest
# (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
