"""Accuracy of zero-shot / random-k / kNN-k selection with the default LM on the shared data.

    .venv/bin/python benchmarks/eval_suite.py --out benchmarks/results/eval_suite  [--rt-limit N]

Rotten Tomatoes: index from rotten_tomatoes_train.jsonl, the canonical rotten_tomatoes_test.jsonl;
SNIPS intents: seeded 80/20 split; E2E NLG: split by distinct input, random-4 vs kNN-4, BLEU and
ROUGE-L against all references. Calibration: PMI for every run (its reference is one premise
prompt); contextual calibration (three content-free inputs with the same demonstrations: 3x the
cost) on the first --cal-limit queries. Writes eval_suite.json and eval_suite.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from icl_engine.core.data import load_dataset
from icl_engine.core.embed import get_embedder
from icl_engine.core.evaluate import evaluate
from icl_engine.core.index import ExampleIndex, folder_state
from icl_engine.core.lm import load_lm
from icl_engine.core.metrics import accuracy, macro_f1
from icl_engine.core.pipeline import Engine, PipelineConfig
from icl_engine.core.registry import E2E_TEMPLATE, INTENT_TEMPLATE, SENTIMENT_TEMPLATE
from icl_engine.core.score import contextual_calibrate, normalize, pmi

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEMPLATES = {
    "rotten_tomatoes": SENTIMENT_TEMPLATE,
    "snips": INTENT_TEMPLATE,  # verbalizers in plain words: "add to playlist", not "add_to_playlist"
    "e2e": E2E_TEMPLATE,
}


def engine_for(name, pool, lm, emb, folder, **cfg) -> Engine:
    if folder_state(folder) == "none":  # built once, reused by later runs
        ExampleIndex.build(pool, emb).save(folder)
    return Engine.load(PipelineConfig(index=str(folder), template=TEMPLATES[name], **cfg), lm=lm, embedder=emb,
                       index=ExampleIndex.load(folder))


def classification_rows(name, eng, test, methods, k, cal_limit):
    rows = []
    premise = eng.premise_log_scores()  # [1, L]
    for m in methods:
        kk = 0 if m == "zero" else k
        r = evaluate(eng, test, method=m, k=kk)
        gold = [p["gold"] for p in r["predictions"]]
        raw = np.array([[np.log(p["probs"][lab]) for lab in eng.index.labels] for p in r["predictions"]])
        labels = eng.index.labels
        base = dict(dataset=name, method=m, k=kk, n=r["n"], seconds=r["seconds"], queries_per_s=r["queries_per_s"],
                    mean_prompt_tokens=r["mean_prompt_tokens"])
        unc = [p["label"] for p in r["predictions"]]
        pm = [labels[i] for i in normalize(pmi(raw, premise)).argmax(1)]
        # gold and predictions kept so that runs over parts of a test set can be merged exactly
        rows.append({**base, "calibration": "none", "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                     "gold": gold, "pred": unc})
        rows.append({**base, "calibration": "pmi", "accuracy": accuracy(gold, pm), "macro_f1": macro_f1(gold, pm, labels),
                     "gold": gold, "pred": pm})
        # contextual calibration on the first cal_limit queries, with each query's own demonstrations
        n = min(cal_limit, len(gold))
        if n == 0:
            continue
        sel = eng.select([rec.input for rec in test.records[:n]], method=m, k=kk)
        cf = eng.content_free_probs(sel)
        cc = [labels[i] for i in contextual_calibrate(raw[:n], np.log(cf)).argmax(1)]
        rows.append({**base, "n": n, "calibration": "contextual", "accuracy": accuracy(gold[:n], cc),
                     "macro_f1": macro_f1(gold[:n], cc, labels), "uncalibrated_accuracy_same_n": accuracy(gold[:n], unc[:n])})
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k not in ("gold", "pred")}), flush=True)
    return rows


def write(out: Path, rows: list[dict], lm, t0: float) -> None:
    """Results so far (called after each dataset, so an interrupted run keeps what it measured)."""
    result = {"machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "lm": lm.name}, "wall_seconds": time.time() - t0, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["| dataset | method | k | calibration | n | accuracy | macro-F1 | BLEU | ROUGE-L | q/s |", "|" + "---|" * 10]
    for r in rows:
        f = lambda key, fmt: format(r[key], fmt) if key in r else ""
        lines.append(f"| {r['dataset']} | {r['method']} | {r['k']} | {r['calibration']} | {r['n']} | "
                     f"{f('accuracy', '.3f')} | {f('macro_f1', '.3f')} | {f('bleu', '.2f')} | {f('rouge_l', '.2f')} | "
                     f"{f('queries_per_s', '.2f')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + f"\n\nMachine: {result['machine']}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_suite"))
    ap.add_argument("--indexes", type=Path, default=Path("indexes/eval_suite"))
    ap.add_argument("--rt-limit", type=int, default=None)
    ap.add_argument("--rt-offset", type=int, default=0, help="skip the first N test reviews (to split a run)")
    ap.add_argument("--cal-limit", type=int, default=300)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--only", nargs="*", default=["rotten_tomatoes", "snips", "e2e"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lm, emb = load_lm(), get_embedder()
    t0, rows = time.time(), []
    if "rotten_tomatoes" in args.only:
        pool = load_dataset(SHARED / "rotten_tomatoes_train.jsonl")
        test = load_dataset(SHARED / "rotten_tomatoes_test.jsonl", labels=pool.labels)
        end = min(len(test), args.rt_offset + (args.rt_limit or len(test)))
        test = test.select(range(args.rt_offset, end))
        eng = engine_for("rotten_tomatoes", pool, lm, emb, args.indexes / "rt", batch_size=8)
        rows += classification_rows("rotten_tomatoes", eng, test, ["zero", "random", "knn"], args.k, args.cal_limit)
        write(args.out, rows, lm, t0)
    if "snips" in args.only:
        pool, test = load_dataset(SHARED / "snips_intents.jsonl").split(0.2, seed=0)
        eng = engine_for("snips", pool, lm, emb, args.indexes / "snips", batch_size=8)
        rows += classification_rows("snips", eng, test, ["zero", "random", "knn"], args.k, args.cal_limit)
        write(args.out, rows, lm, t0)
    if "e2e" in args.only:
        pool, test = load_dataset(SHARED / "e2e_nlg.jsonl").split(0.2, seed=0)
        eng = engine_for("e2e", pool, lm, emb, args.indexes / "e2e", batch_size=8, max_new_tokens=48)
        for m in ("random", "knn"):
            r = evaluate(eng, test, method=m, k=4)
            rows.append(dict(dataset="e2e", method=m, k=4, n=r["n"], calibration="none", bleu=r["bleu"],
                             rouge_l=r["rouge_l"], seconds=r["seconds"], queries_per_s=r["queries_per_s"],
                             mean_prompt_tokens=r["mean_prompt_tokens"], examples=r["predictions"][:3]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "examples"}), flush=True)
    write(args.out, rows, lm, t0)


if __name__ == "__main__":
    main()
