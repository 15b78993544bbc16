"""A probe, not a product setting: does an additive bias on the attention logits of the cached
demonstration blocks bring cached scoring's answers closer to exact scoring's?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_cache_block_bias_probe.py --work ../runs31 --n 240

Cached blocks never attended to each other (core/kvcache.py), so the query's attention over them
differs from the exact prompt's. Parallel-encoding work (APE, Yang et al. 2025) rescales that
attention; the simplest such rescaling is one bias b added to the query's logits on every block
position (the prefix and the query itself unbiased), i.e. the blocks' attention weights times e^b
before normalising. APE's other knob is a temperature T on those logits (q.k / T on block
positions: sharper for T < 1); `--temperatures` runs it at bias 0. Neither is a query option, so
the probe wraps the one function that builds a batch's cached past (`kvcache._past`) to add them.
With `--float32-blocks` it needs no cache: the blocks the queries read are computed alone, in
float32, as context_probe.py does at 0 neighbours.

Queries: n records drawn (seed 0) from the Rotten Tomatoes index itself, each with its own record
excluded from retrieval (leave-one-out): a validation split of the training data; the test file is
not read. Exact kNN-8 once, then cached kNN-8 at each setting. Writes
benchmarks/results/kv_cache/block_bias_probe/{results.json,README.md}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from icl_engine.core import kvcache  # noqa: E402
from icl_engine.core.config import PipelineConfig, QueryOptions  # noqa: E402
from icl_engine.core.pipeline import Engine  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "kv_cache" / "block_bias_probe"  # (--name another folder beside it)


def with_block_bias(bias: list[float], temperature: list[float]):
    """kvcache._past, plus bias[0] on every cached block position's attention logit, and those
    logits divided by temperature[0] (APE's attention temperature: the blocks' keys divided by it,
    in every layer, since a logit is linear in its key)."""
    build = kvcache._past

    def past(lm, cache, prefix, plans, rescale):
        layers, see, extra, starts = build(lm, cache, prefix, plans, rescale)
        P = prefix.length if prefix is not None else 0
        if temperature[0] != 1.0:
            for k, _ in layers:  # [B, H, P+S, D], views of one tensor the batch owns
                k[:, :, P:] /= temperature[0]
        if bias[0]:
            b = torch.zeros(see.shape, dtype=torch.float32) if extra is None else extra.clone()  # [B, P+S]
            b[:, P:] += bias[0] * see[:, P:].float()
            extra = b
        return layers, see, extra, starts

    return past


def with_live_tail(live: list[int]):
    """kvcache._layout, with the last live[0] demonstrations of a sequential layout run with the
    query (attending to the cached blocks before them) instead of read from the cache."""
    lay = kvcache._layout

    def layout(prompt, rows, lengths, P, budget, answer):
        out = lay(prompt, rows, lengths, P, budget, answer)
        m = min(live[0], len(out.rows))
        if m == 0 or out.reuse:
            return out
        start = int(out.starts[-m])
        return kvcache._Layout(out.rows[:-m], out.starts[:-m], list(prompt.ids[start:]), start, False)

    return layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="kv_cache_bench.py's --work (its rt index and cache)")
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--biases", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--live", type=int, nargs="*", default=[], help="also, at bias 0: the last m demonstrations "
                    "run with the query instead of read from the cache")
    ap.add_argument("--temperatures", type=float, nargs="*", default=[], help="also: the blocks' attention logits "
                    "divided by T, at bias 0")
    ap.add_argument("--float32-blocks", action="store_true", help="no cache in --work: compute, in float32, the "
                    "blocks exact kNN-8 reads (as context_probe.py at 0 neighbours) and use those")
    ap.add_argument("--name", default="block_bias_probe", help="results folder under results/kv_cache/")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.float32_blocks:
        from kv_cache_bench import prepare  # (here: a module-level import would be circular)
        prepare("rt", args.work / "indexes")
    engine = Engine.load(PipelineConfig(index="rt", indexes_dir=str(args.work / "indexes")))
    records = engine.index.records
    rows = random.Random(0).sample(range(len(records)), args.n)
    texts, gold = [records[i].input for i in rows], [records[i].output for i in rows]
    exclude = [{records[i].id} for i in rows]
    bias, temperature, live = [0.0], [1.0], [0]
    kvcache._past = with_block_bias(bias, temperature)
    kvcache._layout = with_live_tail(live)

    last = []  # the latest run's predictions

    def run(options: QueryOptions) -> dict:
        t0 = time.process_time()
        last[:] = engine.classify(texts, options, exclude_ids=exclude)
        return {"labels": [p.label for p in last], "cpu_s": time.process_time() - t0}

    runs = {"exact-8": run(QueryOptions(k=8))}
    if args.float32_blocks:
        from kv_cache_context_probe import context_cache
        row_of = {r.id: i for i, r in enumerate(records)}
        needed = np.array(sorted({row_of[d] for p in last for d in p.demo_ids}), np.int64)
        engine.use_kv_cache(context_cache(engine, needed, 0, set(rows)))
    cached = QueryOptions(k=8, scoring="cached")
    for b in args.biases:
        bias[0] = b
        runs[f"cached-8 bias {b:+g}"] = run(cached)
    bias[0] = 0.0
    for t in args.temperatures:
        temperature[0] = t
        runs[f"cached-8 temperature {t:g}"] = run(cached)
    temperature[0] = 1.0
    for m in args.live:
        live[0] = m
        runs[f"cached-8, last {m} live"] = run(cached)
    live[0] = 0
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_cache_block_bias_probe.py "
                         + " ".join(sys.argv[1:]),
              "queries": {"n": len(gold), "from": "the rt index's own records, seed 0, each excluded from its retrieval"},
              "gold": gold, "rows": rows, "runs": runs}
    title = "Cached scoring probes: a bias on the blocks' attention, " + (
        "a temperature on it, " if args.temperatures else "") + "the last demonstrations run live"
    blocks = "float32 blocks computed for these queries" if args.float32_blocks else "the bfloat16 cache"
    write_probe(OUT.parent / args.name, result, title,
                f"{len(gold)} validation queries: Rotten Tomatoes index records (seed 0), each excluded from its own "
                f"retrieval; kNN-8, SmolLM2-135M, {blocks}. Agreement is with exact kNN-8 on the same "
                "queries (its standard error in brackets).")


def write_probe(out: Path, result: dict, title: str, about: str, columns=(("CPU s", "cpu_s"),)) -> None:
    """Every run's accuracy and agreement with the "exact-8" run (with its standard error), added
    to result["runs"]; then results.json and README.md (a table of the runs, plus `columns`:
    (header, run field) pairs) in `out`."""
    gold, runs = result["gold"], result["runs"]
    exact, n = runs["exact-8"]["labels"], len(gold)
    for r in runs.values():
        acc = float(np.mean([a == g for a, g in zip(r["labels"], gold)]))
        agree = float(np.mean([a == e for a, e in zip(r["labels"], exact)]))
        r.update(accuracy=acc, agreement_with_exact8=agree, agreement_se=math.sqrt(agree * (1 - agree) / n))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# {title}", "", f"`{result['command']}`, {result['created']}", "", about, "",
          "| run | accuracy | agreement with exact-8 | " + " | ".join(h for h, _ in columns) + " |",
          "|---|---:|---:|" + "---:|" * len(columns)]
    md += [f"| {name} | {r['accuracy']:.3f} | {r['agreement_with_exact8']:.3f} ({r['agreement_se']:.3f}) | "
           + " | ".join(f"{r.get(k, 0):.0f}" for _, k in columns) + " |" for name, r in runs.items()]
    (out / "README.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
