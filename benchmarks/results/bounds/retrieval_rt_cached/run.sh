#!/bin/bash
cd /work/wt-bounds
start=$(date +%s)
echo "start $(date -Is)"
PYTHONPATH=/work/wt-bounds OMP_NUM_THREADS=1 ICL_NUM_THREADS=1 nice -n 15 /work/main/.venv/bin/python -c 'import sys; sys.argv[0]="icl"; from icl_engine.apps.console import main; main()' \
  bounds run --experiment retrieval --dataset rotten_tomatoes --reference /work/runs/approx/ft/rt \
  --template reports/rt_template.json --k 4 --quick --cached --cached-same-k --out reports/bounds_rt_cached > reports/run_cached.out 2> reports/run_cached.err
rc=$?
echo "end $(date -Is) rc=$rc wall=$(( $(date +%s) - start ))s"
