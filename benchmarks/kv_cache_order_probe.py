"""A probe of the reference, not a product setting: how often does exact kNN-8 agree with itself
when only the order of its eight demonstrations changes?

    OMP_NUM_THREADS=1 ICL_SHARED_DATA=../shared/data .venv/bin/python \\
        benchmarks/kv_cache_order_probe.py --work ../runs31 --task rt --n 400

Cached scoring is judged by its agreement with exact kNN-8 (issue target: >= 95 %). But exact
ICL is itself sensitive to the order of its demonstrations (Lu et al. 2022, "Fantastically
ordered prompts"): the same eight demonstrations, nearest first instead of nearest last, or
shuffled, are an equally valid prompt, and the LM's answers move. That agreement is how far
apart two exact prompts that no one could call wrong already are, the scale on which cached
scoring's distance from exact (it changes only what the demonstrations have read of each other)
can be read. Cached kNN-8 runs on the product's layout (blocks computed alone, m = 0 in
context_probe.py, float32 storage, so storage rounding plays no part).

Queries: n records drawn (seed 0) from the task's index, each excluded from its own retrieval
(leave-one-out, as the other probes): a validation split of the training data; the test file is
not read. Writes benchmarks/results/kv_cache/order_probe_TASK/{results.json,README.md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from kv_cache_block_bias_probe import write_probe  # noqa: E402
from kv_cache_context_probe import PoolQueries, context_cache  # noqa: E402

from icl_engine.core.config import QueryOptions  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "kv_cache"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="where the task's index is (built there if missing)")
    ap.add_argument("--task", choices=["rt", "snips"], default="rt")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="shuffled orders, one run per seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    q = PoolQueries.draw(args.task, args.work, args.n)
    name, engine, qrows, texts, gold, exclude, row_of = q.name, q.engine, q.rows, q.texts, q.gold, q.exclude, q.row_of

    def run(options: QueryOptions) -> tuple[dict, list]:
        t0 = time.process_time()
        got = engine.classify(texts, options, exclude_ids=exclude)
        return {"labels": [p.label for p in got], "cpu_s": time.process_time() - t0}, got

    runs = {}
    runs["exact-8"], exact = run(QueryOptions(k=8))
    demos = [sorted(p.demo_ids) for p in exact]
    orders = [("nearest first", QueryOptions(k=8, order="nearest_first"))]
    orders += [(f"shuffled, seed {s}", QueryOptions(k=8, order="random", seed=s)) for s in args.seeds]
    for label, options in orders:
        runs[f"exact-8, {label}"], got = run(options)
        assert [sorted(p.demo_ids) for p in got] == demos  # the same demonstrations, only their order moved
    needed = np.array(sorted({row_of[d] for ds in demos for d in ds}), np.int64)
    t0 = time.process_time()
    engine.use_kv_cache(context_cache(engine, needed, 0, set(qrows)))
    built = time.process_time() - t0
    runs["cached-8"], got = run(QueryOptions(k=8, scoring="cached"))
    runs["cached-8"]["build_cpu_s"] = built
    assert [sorted(p.demo_ids) for p in got] == demos

    # Every pair of runs: how often they give the same label (the table's column is vs exact-8).
    names, n = list(runs), len(gold)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            agree = float(np.mean([x == y for x, y in zip(runs[a]["labels"], runs[b]["labels"])]))
            pairs[f"{a} | {b}"] = {"agreement": agree, "se": math.sqrt(agree * (1 - agree) / n)}
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_cache_order_probe.py "
                         + " ".join(sys.argv[1:]),
              "queries": {"n": n, "from": f"the {name} index's own records, seed 0, each excluded from its retrieval"},
              "blocks_computed": len(needed), "gold": gold, "rows": qrows, "runs": runs, "pairs": pairs}
    write_probe(OUT / f"order_probe_{name}", result, "Exact kNN-8 against itself: the same demonstrations in "
                "another order",
                f"{n} validation queries: {name} index records (seed 0), each excluded from its own retrieval; "
                "kNN-8, SmolLM2-135M; every run reads the same eight demonstrations per query, only their order "
                "(exact) or what they have read of each other (cached, float32 blocks) differs. Agreement is "
                "with exact kNN-8 as the product orders it, nearest last (its standard error in brackets); "
                "results.json has every pair.")


if __name__ == "__main__":
    main()
