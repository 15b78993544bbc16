#!/usr/bin/env bash
# Creates the peer's venv for benchmarks/openicl_driver.py: OpenICL 0.1.8 (TopkRetriever +
# PPLInferencer) on CPU torch and the same transformers / sentence-transformers as .venv, so both
# sides run the same model code.
#   usage: benchmarks/openicl_env.sh [VENV_DIR]     (default benchmarks/.openicl-venv)
# Idempotent: does nothing when VENV_DIR was completed by this same version of the script.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$ROOT/benchmarks/.openicl-venv}

stamp="$VENV/.openicl-installed-$(sha256sum < "$0" | cut -c1-16)"
[ -f "$stamp" ] && [ -x "$VENV/bin/python" ] && exit 0

PY=$(bash "$(dirname "$0")/../scripts/find-python.sh")

echo "setting up the OpenICL venv $VENV with $("$PY" --version) ..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# 1. torch first, pinned (the CPU build): a bare `torch`, or one pulled in by another package,
#    would fetch a multi-GB CUDA build.
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  "${pip[@]}" "torch==${ICL_TORCH_VERSION:-2.13.0}"
fi
torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)

# 2. What `import openicl` imports at run time (its __init__ imports every retriever, inferencer
#    and evaluator), found by reading its source. Pinned to the versions the driver was checked
#    with; torch is repeated at its installed version so nothing here can replace it.
#    - transformers, sentence-transformers: as in .venv (the driver shims the two spots where
#      OpenICL 0.1.8 predates transformers 5)
#    - faiss-cpu in place of the declared faiss-gpu; accelerate, datasets, numpy, tqdm
#    - evaluate (icl_evaluator), openai + requests (utils/api_service), nltk + rank-bm25
#      (BM25Retriever), scikit-learn (VotekRetriever): unused by the driver, imported by
#      `import openicl` all the same
"${pip[@]}" "torch==$torch_version" \
  "transformers==5.23.0" "sentence-transformers==6.2.0" "faiss-cpu==1.15.1" \
  "accelerate==1.15.0" "datasets==5.2.0" "numpy==2.4.6" "tqdm" \
  "evaluate==0.4.6" "openai==3.54.0" "requests" "nltk==3.10.4" "rank-bm25==0.2.2" \
  "scikit-learn==1.9.1"

# 3. OpenICL itself without its declared dependencies: it pins transformers==4.28.1,
#    tokenizers==0.13.3 and faiss-gpu. Installed last so pip has no conflict to report.
"${pip[@]}" --no-deps "openicl==0.1.8"

HF_HUB_OFFLINE=1 "$VENV/bin/python" -c 'import openicl' >/dev/null 2>&1 \
  || { echo "error: 'import openicl' fails in $VENV" >&2; exit 1; }
rm -f "$VENV"/.openicl-installed-*
touch "$stamp"
echo "OpenICL venv ready: $VENV" >&2
