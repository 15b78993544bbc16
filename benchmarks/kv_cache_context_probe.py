"""A probe, not a product setting: are cached blocks closer to exact ICL when each is computed
after its own nearest neighbours instead of alone?

    OMP_NUM_THREADS=1 ICL_SHARED_DATA=../shared/data .venv/bin/python \\
        benchmarks/kv_cache_context_probe.py --work ../runs31 --task rt --n 240 --contexts 0 2 4

Cached scoring's one approximation (core/kvcache.py) is that a block never read the
demonstrations before it: in an exact kNN-8 prompt, demonstration i has read demonstrations
1..i-1, the query's other neighbours, which resemble it. Here record r's block is computed after
m other records, r's own m nearest neighbours in the index (least similar first, so the nearest
sits right before r, as in a kNN prompt), and only r's tokens' keys and values are kept. Their
keys are turned back to the positions a block alone has (RoPE is a rotation: exact), so the cache
has the product's format and `score_cached` reads it unchanged; only what the block has read
differs. m = 0 is the product's cache. Costs: building runs m + 1 blocks per record; a query
costs what it costs now.

Queries: n records drawn (seed 0) from the task's index, each excluded from its own retrieval
(leave-one-out, as block_bias_probe.py): a validation split of the training data, the test
file is not read. No query record is ever in a block's context (its label would leak). Only the
blocks the queries' kNN-8 retrieves are computed and stored (float32: exact storage; the other
records' blocks are empty, never read).
Writes benchmarks/results/kv_cache/context_probe_TASK/{results.json,README.md}.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from kv_cache_bench import prepare  # noqa: E402
from kv_cache_block_bias_probe import write_probe  # noqa: E402

from icl_engine.core.config import PipelineConfig, QueryOptions  # noqa: E402
from icl_engine.core.kvcache import KVCache  # noqa: E402
from icl_engine.core.pipeline import Engine  # noqa: E402
from icl_engine.core.score import compute_prefix, length_batches  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "kv_cache"


@dataclass
class PoolQueries:
    """n of a task's index records drawn (seed 0) as validation queries, each to be excluded from
    its own retrieval (leave-one-out): the test file is not read."""

    name: str  # the index
    engine: Engine
    rows: list[int]  # the queries' rows in the index
    texts: list[str]
    gold: list[str]
    exclude: list[set[str]]  # per query: its own record id
    row_of: dict[str, int]  # record id -> row

    @classmethod
    def draw(cls, task: str, work: Path, n: int) -> PoolQueries:
        name, _ = prepare(task, work / "indexes")  # (the test records it returns are not used)
        engine = Engine.load(PipelineConfig(index=name, indexes_dir=str(work / "indexes")))
        records = engine.index.records
        rows = random.Random(0).sample(range(len(records)), n)
        return cls(name, engine, rows, [records[i].input for i in rows], [records[i].output for i in rows],
                   [{records[i].id} for i in rows], {r.id: i for i, r in enumerate(records)})


def contexts(index, rows: np.ndarray, m: int, banned: set[int]) -> list[list[int]]:
    """For each record in `rows`: its m nearest other records (cosine; none of `banned`), least
    similar first."""
    if m == 0:
        return [[] for _ in rows]
    sims = index.vectors[rows] @ index.vectors.T  # [R, N]
    sims[np.arange(len(rows)), rows] = -np.inf
    sims[:, sorted(banned)] = -np.inf
    top = np.argsort(-sims, axis=1, kind="stable")[:, :m]  # [R, m] most similar first
    return [t[::-1].tolist() for t in top]


@torch.inference_mode()
def context_cache(engine: Engine, rows: np.ndarray, m: int, banned: set[int], batch: int = 8) -> KVCache:
    """A float32 cache over every record whose `rows` blocks were computed after m neighbours."""
    lm, builder, index = engine.lm, engine.builder, engine.index
    builder.demo_lengths(index.records)(np.arange(len(index)))
    blocks = [builder.demo_ids(r) + builder.sep_ids for r in index.records]
    wanted = set(rows.tolist())  # storage only for these (a float32 cache of all RT would be 18 GB)
    offsets = np.concatenate([[0], np.cumsum([len(b) if i in wanted else 0 for i, b in enumerate(blocks)])])
    shared = builder.shared_ids()
    prefix = compute_prefix(lm, ids=shared) if shared else None
    P = len(shared)
    ctx = contexts(index, rows, m, banned)
    seqs = [[t for c in cx for t in blocks[c]] + blocks[r] for r, cx in zip(rows.tolist(), ctx)]
    data = None
    for part in length_batches(seqs, batch, bucket=True):
        kv, _ = lm.block_kv([seqs[i] for i in part], prefix)  # [B, layers, 2, H, T, D], left-padded
        if data is None:
            data = torch.zeros(int(offsets[-1]), *kv.shape[1:4], kv.shape[5])  # [tokens, layers, 2, H, D]
        T = kv.shape[4]
        for b, i in enumerate(part):
            r, n, c = int(rows[i]), len(blocks[rows[i]]), len(seqs[i]) - len(blocks[rows[i]])
            x = kv[b, :, :, :, T - n:].float().clone()  # [layers, 2, H, n, D]: r's own tokens
            if c:  # built at P + c + j: turned back to P + j, where a block alone sits
                keys = x[:, 0].unsqueeze(1)  # [layers, 1, H, n, D], a view: move_keys turns x's keys in place
                lm.move_keys(keys, torch.arange(P + c, P + c + n)[None, None], torch.arange(P, P + n)[None, None])
            data[offsets[r]: offsets[r + 1]] = x.permute(3, 0, 1, 2, 4)
    manifest = {"dtype": "float32", "prefix_ids": shared, "context": m}
    return KVCache(manifest, data, None, offsets.astype(np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="where the task's index is (built there if missing)")
    ap.add_argument("--task", choices=["rt", "snips"], default="rt")
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--contexts", type=int, nargs="+", default=[0, 2, 4])
    args = ap.parse_args()
    torch.set_num_threads(1)
    q = PoolQueries.draw(args.task, args.work, args.n)
    name, engine, qrows, texts, gold, exclude, row_of = q.name, q.engine, q.rows, q.texts, q.gold, q.exclude, q.row_of

    t0 = time.process_time()
    exact = engine.classify(texts, QueryOptions(k=8), exclude_ids=exclude)
    runs = {"exact-8": {"labels": [p.label for p in exact], "cpu_s": time.process_time() - t0}}
    computed = {row_of[d] for p in exact for d in p.demo_ids}
    needed = np.array(sorted(computed), np.int64)
    for m in args.contexts:
        t0 = time.process_time()
        engine.use_kv_cache(context_cache(engine, needed, m, set(qrows)))
        built = time.process_time() - t0
        t0 = time.process_time()
        got = engine.classify(texts, QueryOptions(k=8, scoring="cached"), exclude_ids=exclude)
        assert {row_of[d] for p in got for d in p.demo_ids} <= computed  # every block read was computed
        runs[f"cached-8, blocks after {m} neighbours"] = {"labels": [p.label for p in got], "build_cpu_s": built,
                                                          "cpu_s": time.process_time() - t0}
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_cache_context_probe.py "
                         + " ".join(sys.argv[1:]),
              "queries": {"n": len(gold), "from": f"the {name} index's own records, seed 0, each excluded from its "
                          "retrieval"},
              "blocks_computed": len(needed), "gold": gold, "rows": qrows, "runs": runs}
    write_probe(OUT / f"context_probe_{name}", result, "Cached scoring probe: each block computed after its own "
                "nearest neighbours",
                f"{len(gold)} validation queries: {name} index records (seed 0), each excluded from its own retrieval "
                f"and from every block's context; kNN-8, SmolLM2-135M, float32 blocks ({len(needed)} computed). "
                "Agreement is with exact kNN-8 on the same queries (its standard error in brackets).",
                columns=(("CPU s (queries)", "cpu_s"), ("CPU s (blocks)", "build_cpu_s")))


if __name__ == "__main__":
    main()
