#!/usr/bin/env bash
# The test suite, slow tests with the real packaged models and the Ray tests included, on one
# pytest-xdist worker per core (at most 4; --dist loadgroup keeps the Ray tests, which share one
# local Ray, on one worker), with the 15 slowest tests listed at the end. Extra args go to pytest
# (e.g. `bash scripts/test.sh -m "not slow"`, or `-n 0` for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
ICL_EXTRAS=dev,ray bash scripts/setup.sh  # Ray too: its tests run here (one local Ray, 2 CPUs)
workers=$(.venv/bin/python -c 'import os
n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
print(max(1, min(4, n)))')
exec .venv/bin/python -m pytest -n "$workers" --dist loadgroup --durations=15 "$@"
