#!/usr/bin/env bash
# Issue 14's GPU measurement in one call, from a plain checkout on a machine with one CUDA GPU:
# bfloat16 at LM batch sizes 64..1024 (with and without preparing the next chunk in a thread),
# MFU against a bfloat16 matmul measured in the same run, a float32 pass on the GPU, and the
# predictions' agreement with the float32 CPU engine (benchmarks/results/gpu/cpu_float32_predictions.json).
# Needs python with torch (CUDA), transformers and numpy; no faiss, no gguf, no packaged wheels.
#   usage: benchmarks/gpu_bench.sh MODEL_DIR [DATA_DIR] [gpu_bench.py options...]
#   MODEL_DIR: a Hugging Face folder of the LM (here: ~/.cache/icl_engine/models/smollm2-135m-instruct),
#              or a .gguf file (converted once into $ICL_CACHE/models/; needs the gguf package)
#   DATA_DIR:  rotten_tomatoes_{train,test}.jsonl (default: ./shared/data, else ../shared/data)
# Results: benchmarks/results/gpu/gpu_bench.{json,md}.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LM=${1:?usage: benchmarks/gpu_bench.sh MODEL_DIR [DATA_DIR] [options]}
shift
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then DATA=$1; shift
elif [ -d "$ROOT/shared/data" ]; then DATA=$ROOT/shared/data
else DATA=$ROOT/../shared/data; fi
PY=${PYTHON:-python3}
[ -f "$LM/config.json" ] || [ "${LM%.gguf}" != "$LM" -a -f "$LM" ] \
  || { echo "error: $LM is neither a Hugging Face model folder (no config.json) nor a .gguf file" >&2; exit 1; }
[ -f "$DATA/rotten_tomatoes_test.jsonl" ] || { echo "error: no rotten_tomatoes_test.jsonl in $DATA" >&2; exit 1; }
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "error: $PY has no CUDA torch" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv 2>/dev/null || true
cd "$ROOT"
"$PY" benchmarks/gpu_bench.py --lm "$LM" --data "$DATA" --float32-check "$@"
