"""Templates on the user's own file: the hand-written template against the one made from the data
(`icl index build FILE`) and the one the template search picks (`--auto-template`).

    .venv/bin/python benchmarks/template_bench.py                          # RT (500 test) and SNIPS (139)
    .venv/bin/python benchmarks/template_bench.py --datasets snips --n 50  # a quick look

Indexes are built from the plain files as a user has them (RT: rotten_tomatoes_train.jsonl;
SNIPS: the seeded 80/20 split of snips_intents.jsonl, 554 / 139), with the default embedder.
Each template is evaluated with kNN-k and random-k on the same test examples (random draws are
seeded, so every template sees the same random demonstrations); differences to the hand-written
template are paired, with their standard error. Runs are cached under --out/runs (resumable).
Writes --out/results.json and results.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icl_engine.core.config import PipelineConfig  # noqa: E402
from icl_engine.core.data import load_dataset  # noqa: E402
from icl_engine.core.embed import get_embedder  # noqa: E402
from icl_engine.core.evaluate import evaluate  # noqa: E402
from icl_engine.core.index import ExampleIndex  # noqa: E402
from icl_engine.core.lm import load_lm  # noqa: E402
from icl_engine.core.pipeline import Engine  # noqa: E402
from icl_engine.core.prompt import Template  # noqa: E402
from icl_engine.core.registry import BUILTINS, INTENT_TEMPLATE, SENTIMENT_TEMPLATE  # noqa: E402
from icl_engine.core.template_search import paired_gain, search_templates  # noqa: E402
from icl_engine.core.templates import data_template, template_candidates  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
HAND = {"rt": SENTIMENT_TEMPLATE, "snips": INTENT_TEMPLATE}


def datasets(name: str, n: int | None):
    if name == "rt":
        pool = load_dataset(DATA / "rotten_tomatoes_train.jsonl")
        test = load_dataset(DATA / "rotten_tomatoes_test.jsonl", labels=pool.labels)
    else:
        pool, test = BUILTINS["snips_intents"].splits(DATA)
    return pool, test.select(range(min(n or len(test), len(test))))


def cached(path: Path, fingerprint: dict, run):
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") == fingerprint:
            return old
    result = {"fingerprint": fingerprint, **run()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def run_dataset(name: str, args, lm, emb, out: Path) -> dict:
    pool, test = datasets(name, args.n)
    index = ExampleIndex.build(pool, emb)
    default, notes = data_template(pool)
    search = cached(out / "runs" / f"{name}-search.json",
                    {"pool": pool.sha256, "k": args.k, "n": args.search_examples, "lm": lm.name, "dtype": args.dtype,
                     "candidates": {n: t.to_dict() for n, t in template_candidates(pool).items()},
                     "rule": "one standard error"},
                    lambda: search_templates(index, lm, emb, k=args.k, n_validation=args.search_examples).to_dict())
    best = next(c for c in search["candidates"] if c["name"] == search["best"])
    templates = {"hand-written": HAND[name], "default (made from the data)": default}
    templates["auto-template"] = Template.from_dict(best["template"])
    rows, correct = [], {}
    for tname, tpl in templates.items():
        for method in ("knn", "random"):
            fp = {"pool": pool.sha256, "test": test.sha256, "template": tpl.to_dict(), "method": method, "k": args.k,
                  "lm": lm.name, "dtype": args.dtype, "embedder": emb.name}
            key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]

            def run():
                cfg = PipelineConfig(index=pool.name, lm=lm.name, k=args.k, method=method, seed=0)
                engine = Engine.from_parts(cfg, index, emb, lm, tpl)
                r = evaluate(engine, test, method=method, k=args.k, progress=False)
                return {"accuracy": r["accuracy"], "n": r["n"], "seconds": r["seconds"],
                        "correct": [int(p["gold"] == p["label"]) for p in r["predictions"]]}

            r = cached(out / "runs" / f"{name}-{key}.json", fp, run)
            correct[(tname, method)] = r["correct"]
            rows.append({"template": tname, "method": method, "accuracy": r["accuracy"], "n": r["n"],
                         "seconds": r["seconds"]})
            print(f"{name} {tname} {method}-{args.k}: {r['accuracy']:.3f} (n={r['n']})", file=sys.stderr, flush=True)
    for row in rows:
        diff, se = paired_gain(correct[(row["template"], row["method"])], correct[("hand-written", row["method"])])
        row["vs_hand_written"] = {"diff": diff, "se": se}
    for tname in templates:
        acc = {row["method"]: row["accuracy"] for row in rows if row["template"] == tname}
        for row in rows:
            if row["template"] == tname:
                row["knn_above_random"] = acc["knn"] > acc["random"]
    return {"pool": len(pool), "test": len(test), "default_template": default.to_dict(), "default_notes": notes,
            "search": search,
            "rows": rows}


def markdown(results: dict) -> str:
    lines = ["# Templates on the user's own file", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['cpus']} CPUs, torch threads "
             f"{results['machine']['threads']}, LM {results['lm']} ({results['dtype']}), embedder {results['embedder']}, "
             f"k = {results['k']}. {results['date']}.", ""]
    for name, r in results["datasets"].items():
        s = r["search"]
        lines += [f"## {name}: pool {r['pool']}, test {r['test']}", "",
                  "| template | method | accuracy | vs hand-written (paired ± SE) | kNN > random |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            v = row["vs_hand_written"]
            lines.append(f"| {row['template']} | {row['method']}-{results['k']} | {row['accuracy']:.3f} | "
                         f"{100 * v['diff']:+.1f} ± {100 * v['se']:.1f} pts | {'yes' if row['knn_above_random'] else 'no'} |")
        lines += ["", f"Template search: {len(s['candidates'])} candidates on {s['n_validation']} held-out pool "
                  f"examples, {s['seconds']:.0f} s; chosen: **{s['best']}**.", "",
                  "| candidate | held-out accuracy |", "|---|---|"]
        lines += [f"| {c['name']} | {c['score']:.3f} |" for c in s["candidates"]]
        lines += ["", f"Default template: `{json.dumps(r['default_template']['instruction'])}`, "
                  f"`{json.dumps(r['default_template']['input_format'])}`", ""]
    return "\n".join(lines)


def _cpu() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["rt", "snips"], choices=["rt", "snips"])
    p.add_argument("--n", type=int, default=None, help="first N test examples (default: RT 500, SNIPS all)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--search-examples", type=int, default=150)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "templates"))
    args = p.parse_args()
    import torch

    out = Path(args.out)
    lm = load_lm(dtype=args.dtype)
    torch.set_num_threads(args.threads)
    emb = get_embedder()
    results = {"command": "python benchmarks/template_bench.py " + " ".join(sys.argv[1:]),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "lm": lm.name, "dtype": args.dtype,
               "embedder": emb.name, "k": args.k,
               "machine": {"cpu": _cpu(), "cpus": os.cpu_count(),
                           "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},
               "datasets": {}}
    for name in args.datasets:
        n = args.n if args.n is not None else (500 if name == "rt" else None)
        args_n = argparse.Namespace(**{**vars(args), "n": n})
        results["datasets"][name] = run_dataset(name, args_n, lm, emb, out)
    suffix = "" if set(args.datasets) == {"rt", "snips"} else "_" + "_".join(args.datasets)
    (out / f"results{suffix}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / f"results{suffix}.md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
