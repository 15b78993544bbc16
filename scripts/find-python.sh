#!/usr/bin/env bash
# Prints the Python (>= 3.10) to build virtual environments with: $PYTHON, else the newest of
# python3.11/3.12/3.10/python3 on PATH. Exits 1 with a one-line error if there is none.
set -euo pipefail
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.10 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "error: no python3 found (need Python >= 3.10)" >&2; exit 1; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: $PY is older than Python 3.10" >&2; exit 1; }
echo "$PY"
