"""Cached scoring (demonstration KV caches, core/kvcache.py) against exact scoring, on Rotten
Tomatoes and SNIPS, with the packaged SmolLM2-135M-Instruct and MiniLM.

    OMP_NUM_THREADS=1 ICL_SHARED_DATA=/work/shared/data \\
        .venv/bin/python benchmarks/kv_cache_bench.py --work ../runs31 --tasks snips rt

Per task: the index (RT: `icl index build rotten_tomatoes:train --name rt`, 11,752 reviews, the
built-in template; SNIPS: the built-in 80/20 split's pool, 554 utterances, its template) and its
bfloat16 KV cache (`icl index cache`) are built under --work once (sizes and build time recorded).
Then ONE pass over the test set (RT: rotten_tomatoes_test.jsonl, 1,000; SNIPS: the split's 139)
in blocks of --block queries; every block is classified by every method (exact kNN-8, and cached
kNN at each k of --ks), the order of the methods rotated from block to block so drifting load
(the machine's other core is busy) hits each alike. For each method and block: CPU time (process
time: this process, 1 torch thread) of `engine.prepare` (embed, retrieve, assemble) and of
`engine.finish` (score), and wall time. Reported: medians over blocks of CPU time per query; the
queries per CPU-second ratio exact/cached as the median of the per-block ratios (and the ratio
of the medians); accuracy (with its standard error), the paired difference to exact kNN-8 (with
its standard error from the discordant pairs) and prediction agreement. Blocks already done are
kept in --work (a killed run resumes). Writes benchmarks/results/kv_cache/results.json and
README.md (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from icl_engine.apps.indexes import build_index, cache_index  # noqa: E402
from icl_engine.core.config import PipelineConfig, QueryOptions  # noqa: E402
from icl_engine.core.data import load_dataset  # noqa: E402
from icl_engine.core.embed import get_embedder  # noqa: E402
from icl_engine.core.index import ExampleIndex, index_path  # noqa: E402
from icl_engine.core.kvcache import KVCache, KVCacheError, kv_folder  # noqa: E402
from icl_engine.core.pipeline import Engine  # noqa: E402
from icl_engine.core.registry import BUILTINS, INTENT_TEMPLATE, data_dir  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "kv_cache"
EXACT = "exact-8"


def prepare(task: str, indexes: Path) -> tuple[str, list]:
    """The task's index (built once) and its test records."""
    folder = index_path(task, indexes)
    if task == "rt":
        if not folder.exists():
            build_index("rotten_tomatoes:train", "rt", indexes_dir=indexes)
        return "rt", list(load_dataset(data_dir() / "rotten_tomatoes_test.jsonl").records)
    pool, test = BUILTINS["snips_intents"].splits()
    if not folder.exists():
        ExampleIndex.build(pool, get_embedder("all-MiniLM-L6-v2")).save(folder, template=INTENT_TEMPLATE.to_dict())
    return "snips", list(test.records)


def cached_ok(engine: Engine) -> bool:
    try:
        engine.kv_cache()
        return True
    except KVCacheError:
        return False


def options(method: str, batch: int) -> QueryOptions:
    """"exact-8", "cached-32", or "cached-32-b512" (a budget of 512 tokens: position reuse beyond)."""
    scoring, k, *budget = method.split("-")
    return QueryOptions(k=int(k), scoring=scoring, batch_size=batch, budget=int(budget[0][1:]) if budget else None)


def run_block(engine: Engine, texts: list[str], o: QueryOptions) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    prepared = engine.prepare(texts, o)
    c1 = time.process_time()
    preds = engine.finish(prepared)
    c2, w2 = time.process_time(), time.perf_counter()
    return {"cpu_prepare": c1 - c0, "cpu_score": c2 - c1, "cpu": c2 - c0, "wall": w2 - w0,
            "labels": [p.label for p in preds], "prompt_tokens": [p.prompt_tokens for p in preds],
            "demos": [len(p.demo_ids) for p in preds]}


def summarise(task: str, blocks: list[dict], gold: list[str], methods: list[str], context: int, answer: int) -> dict:
    n = len(gold)
    labels = {m: [lab for b in blocks for lab in b[m]["labels"]] for m in methods}
    correct = {m: np.array([g == p for g, p in zip(gold, labels[m])]) for m in methods}
    out = {}
    for m in methods:
        per_q = [b[m]["cpu"] / len(b[m]["labels"]) for b in blocks]
        acc = float(correct[m].mean())
        tokens = [t for b in blocks for t in b[m]["prompt_tokens"]]
        row = {
            "accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n),
            "cpu_ms_per_query": 1000 * statistics.median(per_q),
            "cpu_ms_per_query_prepare": 1000 * statistics.median(b[m]["cpu_prepare"] / len(b[m]["labels"]) for b in blocks),
            "cpu_ms_per_query_score": 1000 * statistics.median(b[m]["cpu_score"] / len(b[m]["labels"]) for b in blocks),
            "wall_ms_per_query": 1000 * statistics.median(b[m]["wall"] / len(b[m]["labels"]) for b in blocks),
            "mean_prompt_tokens": float(np.mean(tokens)),
            "mean_demos": float(np.mean([d for b in blocks for d in b[m]["demos"]])),
            "position_reuse_queries": int(sum(t + answer > (options(m, 1).budget or context) for t in tokens))
            if m != EXACT else 0,
        }
        if m != EXACT:
            ratios = [b[EXACT]["cpu"] / b[m]["cpu"] for b in blocks]  # same queries: queries/CPU-s of m over exact
            disc_m = int((correct[m] & ~correct[EXACT]).sum())
            disc_e = int((~correct[m] & correct[EXACT]).sum())
            row.update(
                speedup_vs_exact8_median_of_blocks=statistics.median(ratios),
                speedup_vs_exact8_ratio_of_medians=out[EXACT]["cpu_ms_per_query"] / row["cpu_ms_per_query"]
                if EXACT in out else None,
                accuracy_minus_exact8=acc - float(correct[EXACT].mean()),
                # paired: Var(mean of d), d in {-1, 0, 1} per query
                accuracy_minus_exact8_se=math.sqrt(max((disc_m + disc_e) / n - ((disc_m - disc_e) / n) ** 2, 0) / n),
                agreement_with_exact8=float(np.mean([a == b for a, b in zip(labels[m], labels[EXACT])])),
            )
        out[m] = row
    return out


def targets(methods: dict) -> dict:
    """The issue's targets, checked on this task's numbers: at k = 8 cached scoring answers >= 5x
    the queries per CPU-second of exact scoring, within 1 accuracy point, agreeing on >= 95 % of
    the predictions; the most accurate cached k >= 32 that costs no more CPU per query than exact
    kNN-8 beats exact kNN-8's accuracy."""
    c8, exact = methods["cached-8"], methods[EXACT]
    out = {
        "k8_speedup": {"value": c8["speedup_vs_exact8_median_of_blocks"], "target": ">= 5",
                       "met": c8["speedup_vs_exact8_median_of_blocks"] >= 5},
        # "within 1 point", read both ways: |difference| <= 1 point, and no more than 1 point below exact
        "k8_accuracy_difference": {"value": c8["accuracy_minus_exact8"], "paired_se": c8["accuracy_minus_exact8_se"],
                                   "target": "within 0.01", "met": abs(c8["accuracy_minus_exact8"]) <= 0.01,
                                   "at_most_0.01_below": c8["accuracy_minus_exact8"] >= -0.01},
        "k8_agreement": {"value": c8["agreement_with_exact8"], "target": ">= 0.95",
                         "met": c8["agreement_with_exact8"] >= 0.95},
    }
    many = {m: r for m, r in methods.items() if m != EXACT and m.count("-") == 1 and int(m.split("-")[1]) >= 32
            and r["cpu_ms_per_query"] <= exact["cpu_ms_per_query"]}
    if many:
        best = max(many, key=lambda m: (many[m]["accuracy"], -many[m]["cpu_ms_per_query"]))
        r = many[best]
        out["many_shot"] = {"best": best, "accuracy_minus_exact8": r["accuracy_minus_exact8"],
                            "paired_se": r["accuracy_minus_exact8_se"], "cpu_ms_per_query": r["cpu_ms_per_query"],
                            "exact8_cpu_ms_per_query": exact["cpu_ms_per_query"],
                            "target": "accuracy above exact-8 at no more CPU per query", "met": r["accuracy_minus_exact8"] > 0,
                            "beyond_two_se": r["accuracy_minus_exact8"] > 2 * r["accuracy_minus_exact8_se"]}
    else:
        out["many_shot"] = {"best": None, "met": False, "note": "no cached k >= 32 costs as little CPU as exact-8"}
    return out


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "python": platform.python_version(), "ram_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="indexes, caches and finished blocks (not the repo)")
    ap.add_argument("--tasks", nargs="+", default=["snips", "rt"], choices=["snips", "rt"])
    ap.add_argument("--ks", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--rt-ks", nargs="+", type=int, default=None, help="RT's cached ks, if fewer (time)")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="the first N test queries only (a quick look)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--reuse-ks", nargs="*", type=int, default=[], help="also cached at these k with --reuse-budget "
                    "tokens: the prompts that do not fit are laid out with position reuse")
    ap.add_argument("--reuse-budget", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import faiss

    faiss.omp_set_num_threads(1)
    indexes = args.work / "indexes"
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"tasks": {}}
    command = ("OMP_NUM_THREADS=1 ICL_SHARED_DATA=/work/shared/data .venv/bin/python benchmarks/kv_cache_bench.py "
               + " ".join(sys.argv[1:]))
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    results.update(command=command, machine=machine(), commit=commit,
                   updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for task in args.tasks:
        name, test = prepare(task, indexes)
        test = test[: args.limit]
        engine = Engine.load(PipelineConfig(index=name, indexes_dir=str(indexes)))
        cache_info = results["tasks"].get(task, {}).get("cache")
        if not cached_ok(engine):
            c0 = time.process_time()
            info = cache_index(name, indexes_dir=indexes)
            cache_info = {**info, "build_cpu_seconds": time.process_time() - c0}
        ks = args.rt_ks if task == "rt" and args.rt_ks else args.ks
        methods = [EXACT] + [f"cached-{k}" for k in ks] + [f"cached-{k}-b{args.reuse_budget}" for k in args.reuse_ks]
        done_path = args.work / f"blocks-{task}-n{len(test)}-b{args.block}-{args.batch}-{'_'.join(methods)}.jsonl"
        done = [json.loads(ln) for ln in done_path.read_text().splitlines()] if done_path.exists() else []
        starts = list(range(0, len(test), args.block))
        print(f"{task}: {len(test)} queries, {len(starts)} blocks, {len(done)} done; methods {methods}", flush=True)
        resumed = len(done)
        t0 = time.perf_counter()
        for bi, s in enumerate(starts):
            if bi < len(done):
                continue
            texts = [r.input for r in test[s: s + args.block]]
            order = methods[bi % len(methods):] + methods[: bi % len(methods)]
            block = {"start": s}
            for m in order:
                block[m] = run_block(engine, texts, options(m, args.batch))
            with open(done_path, "a") as f:
                f.write(json.dumps(block) + "\n")
            done.append(block)
            ms = {m: round(1000 * block[m]["cpu"] / len(texts)) for m in methods}
            print(f"  block {bi + 1}/{len(starts)} ({time.perf_counter() - t0:.0f} s): cpu ms/query {ms}", flush=True)
        gold = [r.output for r in test[: sum(len(b[EXACT]["labels"]) for b in done)]]  # blocks run from the start
        kv = engine.kv_cache()
        results["tasks"][task] = {
            "index": {"name": name, "records": len(engine.index), "version": engine.index_version},
            "test_queries": len(gold), "blocks": len(done), "block_size": args.block, "batch_size": args.batch,
            # blocks measured by an earlier run of this script (same settings), read back from --work
            "blocks_from_earlier_runs": resumed,
            "context_length": engine.lm.context_length,
            "cache": cache_info or {"dtype": kv.manifest["dtype"], "tokens": kv.manifest["tokens"],
                                    "bytes": kv.manifest["bytes"], "bytes_per_record": kv.manifest["bytes_per_record"],
                                    "bytes_per_token": kv.manifest["bytes_per_token"], "seconds": kv.manifest["seconds"]},
            "methods": summarise(task, done, gold, methods, engine.lm.context_length, engine.builder.max_answer_len),
        }
        if "cached-8" in methods:
            results["tasks"][task]["targets"] = targets(results["tasks"][task]["methods"])
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "README.md").write_text(report(results))


def report(results: dict) -> str:
    lines = ["# Cached vs exact scoring (demonstration KV caches)", "",
             f"Command: `{results['command']}` (commit {results.get('commit')}; blocks measured by earlier runs of "
             "the same settings are read back from --work, see `blocks_from_earlier_runs`)", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['logical_cpus']} logical CPUs ("
             + (f"load average {results['machine']['load_average_at_start']} at start"
                if "load_average_at_start" in results["machine"] else "one busy with another job")
             + f"), {results['machine']['torch_threads']} torch thread, torch {results['machine']['torch']}. "
             "CPU = process time of this process; medians over blocks of queries; every block is run by every "
             "method, in rotating order.", ""]
    for task, r in results["tasks"].items():
        c = r["cache"]
        lines += [f"## {task}: {r['index']['records']} records, {r['test_queries']} test queries "
                  f"({r['blocks']} blocks of {r['block_size']}, LM batch {r['batch_size']})", "",
                  f"KV cache ({c['dtype']}): {c['tokens']:,} tokens, {c['bytes'] / 1e9:.3g} GB, "
                  f"{c['bytes_per_record'] / 1e3:.3g} KB a record, {c['bytes_per_token']:,} bytes a token; built in "
                  f"{c.get('seconds', 0):.0f} s.", "",
                  "| method | accuracy (SE) | vs exact-8 (paired SE) | agreement with exact-8 | CPU ms/query "
                  "(prepare + score) | queries/CPU-s vs exact-8 (median of blocks) | mean prompt tokens | "
                  "queries with position reuse |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, row in r["methods"].items():
            vs = "" if m == EXACT else f"{100 * row['accuracy_minus_exact8']:+.1f} ({100 * row['accuracy_minus_exact8_se']:.1f})"
            agree = "" if m == EXACT else f"{100 * row['agreement_with_exact8']:.1f} %"
            speed = "" if m == EXACT else f"{row['speedup_vs_exact8_median_of_blocks']:.2f}x"
            lines.append(f"| {m} | {100 * row['accuracy']:.1f} ({100 * row['accuracy_se']:.1f}) | {vs} | {agree} | "
                         f"{row['cpu_ms_per_query']:.0f} ({row['cpu_ms_per_query_prepare']:.0f} + "
                         f"{row['cpu_ms_per_query_score']:.0f}) | {speed} | {row['mean_prompt_tokens']:.0f} | "
                         f"{row['position_reuse_queries']} |")
        t = r.get("targets")
        if t:
            lines += ["", "Targets: " + "; ".join(
                f"{name} {v['value']:.3g} ({v['target']}): {'met' if v['met'] else 'not met'}"
                + ("" if v.get("at_most_0.01_below") is None else
                   f" (no more than 1 point below exact: {'yes' if v['at_most_0.01_below'] else 'no'}; paired SE "
                   f"{v['paired_se']:.3g})")
                for name, v in t.items() if name != "many_shot")]
            ms = t["many_shot"]
            lines.append(f"Many-shot: best cached k >= 32 at no more CPU than exact-8: {ms.get('best')}, "
                         + (f"{100 * ms['accuracy_minus_exact8']:+.1f} points (paired SE "
                            f"{100 * ms['paired_se']:.1f}) at {ms['cpu_ms_per_query']:.0f} vs "
                            f"{ms['exact8_cpu_ms_per_query']:.0f} CPU ms/query: "
                            f"{'met' if ms['met'] else 'not met'}"
                            f"{'' if ms['beyond_two_se'] else ' (within two standard errors: noise)'}"
                            if ms.get("best") else ms.get("note", "")))
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
