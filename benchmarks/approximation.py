"""The approximation protocol's test stage (docs/approximation.md), resumable.

Selection already ran (`icl index fit NAME --reference REF`, which wrote the fit and its
validation table); this reads the test file once for each fixed row and nothing else:

  selected   the fit attached to the index, through the product path (`icl eval`, method auto),
             seed 0. Seeds 1 and 2, per task: "refit" (SNIPS, E2E) fits the same setting again with
             that seed on a copy of the index (`icl index fit --refit --seed S`: the anchors'
             context, a readout, a soft prompt's run; the validation split kept) and answers
             through the product path too; "mix" (RT, run before --refit existed) refits only the
             anchors and their readout (`icl anchors build --seed S --readout linear`) and mixes
             them with the same kNN ICL answers (ICL itself draws nothing at random)
  reference  the fine-tuned LM, zero-shot prompts
  zero, knn-8, random-8 (seeds 0, 1, 2)   the fixed baselines, never selected

Every row is one `icl` command whose JSON (with per-example predictions) lands in
`RUNS/test-NAME/ROW.json`; a row already there is not run again, so an interrupted run resumes.
Then `summarize` writes accuracy, the gap to the reference and agreement with it, each with a
95 % bootstrap interval (2,000 resamples of test examples, seeds averaged inside a resample),
plus what each row trained on how many labelled records, to benchmarks/results/approximation/NAME/.
A generation task (E2E) reports ROUGE-L instead, with its gap to the reference and, in place of
agreement, ROUGE-L against the reference's own outputs; its test.json keeps every row's outputs
and the references, so each figure can be recomputed.

    python benchmarks/approximation.py rt --runs ../runs/approx --jobs 2     # OMP_NUM_THREADS=1 per job
    python benchmarks/approximation.py rt --runs ../runs/approx --summarize  # only the report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from icl_engine.core import fits
from icl_engine.core.index import ExampleIndex
from icl_engine.core.index.store import read_pointer
from icl_engine.core.metrics import rouge_l_pair

HERE = Path(__file__).resolve().parent
TASKS = {  # the index, the test set (a file under the shared data folder, or a built-in split's name),
    # the reference (under RUNS), how seeds 1 and 2 of the selected row are made (see above)
    "rt": {"index": "rt", "test": "rotten_tomatoes_test.jsonl", "reference": "ft/rt", "seeds": "mix"},
    "snips": {"index": "snips", "test": "snips_intents:test", "reference": "ft/snips", "seeds": "refit"},
    "e2e": {"index": "e2e", "test": "e2e_nlg:test", "reference": "ft/e2e", "seeds": "refit",
            "fit": "icl index fit e2e --validation 30 --ipt-steps 50"},
}
SEEDS = (0, 1, 2)
RESAMPLES = 2000


def rows(task: dict, runs: Path, out: Path, test: str) -> list[dict]:
    """Every row: its name, the `icl` arguments, the rows it needs first, and what marks it done."""
    common = ["--test", test, "--indexes-dir", str(runs / "indexes"), "--json", "--predictions"]
    fit = json.loads((fit_folder(runs, task) / "fit.json").read_text())
    plan = [{"name": "selected-seed0", "args": ["eval", task["index"], *common]}]
    for s in SEEDS[1:] if task["seeds"] == "refit" else ():
        copy = seed_indexes(runs, task, out, s)
        ref = ["--reference", str(runs / task["reference"])] if fit["reference_labels"] else []
        plan += [{"name": f"refit-seed{s}", "args": ["index", "fit", task["index"], "--refit", "--seed", str(s), *ref,
                                                     "--indexes-dir", str(copy), "--json"]},
                 {"name": f"selected-seed{s}", "needs": [f"refit-seed{s}"],
                  "args": ["eval", task["index"], "--test", test, "--indexes-dir", str(copy), "--json",
                           "--predictions"]}]
    for s in SEEDS if task["seeds"] == "mix" else ():  # the readout alone: mixed with the ICL answers in summarize
        anchors = fit_folder(runs, task) / fit["anchors"] if s == 0 else out / f"anchors-seed{s}"
        if s:
            plan.append({"name": f"anchors-seed{s}", "done": anchors / "readout.json",
                         "args": ["anchors", "build", task["index"], "--out", str(anchors), "--seed", str(s),
                                  "--readout", "linear", "--indexes-dir", str(runs / "indexes"), "--force"]})
        plan.append({"name": f"readout-seed{s}", "needs": [] if s == 0 else [f"anchors-seed{s}"],
                     "args": ["eval", task["index"], *common, "--method", "knn", "--anchors", str(anchors),
                              "--anchor-weight", "1", "--anchor-readout", "linear"]})
    plan += [{"name": "reference", "args": ["eval", task["index"], *common, "--lm", str(runs / task["reference"]),
                                            "--method", "zero", "--k", "0"]},
             {"name": "zero", "args": ["eval", task["index"], *common, "--method", "zero", "--k", "0"]},
             {"name": "knn-8", "args": ["eval", task["index"], *common, "--method", "knn", "--k", "8"]}]
    plan += [{"name": f"random-8-seed{s}", "args": ["eval", task["index"], *common, "--method", "random", "--k", "8",
                                                    "--seed", str(s)]} for s in SEEDS]
    order = ["selected-seed0", "readout-seed0", "reference", "zero", "refit-seed1", "anchors-seed1", "readout-seed1",
             "selected-seed1", "knn-8", "refit-seed2", "anchors-seed2", "readout-seed2", "selected-seed2",
             "random-8-seed0", "random-8-seed1", "random-8-seed2"]
    return sorted(plan, key=lambda r: order.index(r["name"]))


def seed_indexes(runs: Path, task: dict, out: Path, seed: int) -> Path:
    """An indexes folder holding a copy of the task's index (its fit included), for the refit
    with `seed`; made once (the copy is atomic), so the task's own index is never touched."""
    copy = out / f"indexes-seed{seed}"
    if not (copy / task["index"]).is_dir():
        tmp = out / f".indexes-seed{seed}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(runs / "indexes" / task["index"], tmp / task["index"], symlinks=True)
        tmp.replace(copy)
    return copy


def fit_folder(runs: Path, task: dict) -> Path:
    """The fit of the index's current version (where `icl index fit` attached it)."""
    index = runs / "indexes" / task["index"]
    return fits.fit_folder(index, read_pointer(index))


def run(plan: list[dict], out: Path, icl: str, jobs: int) -> None:
    """Each row once (a row's JSON is written only when its command succeeded), `jobs` at a time,
    a row starting when the rows it needs are done. A row that failed is not tried again in this
    run (nor the rows that need it): the next run tries it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ICL_NUM_THREADS": "1"}
    done = {r["name"] for r in plan if _done(r, out)}
    running: set[str] = set()
    failed: set[str] = set()
    lock = threading.Lock()

    def next_row():
        with lock:
            for r in plan:
                if r["name"] not in done | running | failed and set(r.get("needs", [])) <= done:
                    running.add(r["name"])
                    return r
        return None

    def worker():
        while (r := next_row()) is not None:
            started = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {r['name']}: icl {' '.join(r['args'][:3])} ...", file=sys.stderr)
            with open(out / f"{r['name']}.log", "w") as log:
                got = subprocess.run([icl, *r["args"]], stdout=subprocess.PIPE, stderr=log, env=env, text=True)
            with lock:
                running.discard(r["name"])
                if got.returncode == 0:
                    if "done" not in r:
                        tmp = out / f"{r['name']}.json.tmp"
                        tmp.write_text(got.stdout)
                        tmp.replace(out / f"{r['name']}.json")
                    done.add(r["name"])
                else:
                    failed.add(r["name"])
            status = "done" if got.returncode == 0 else f"failed (rc {got.returncode}, see {r['name']}.log)"
            print(f"[{time.strftime('%H:%M:%S')}] {r['name']}: {status} in {time.time() - started:.0f} s",
                  file=sys.stderr)

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _done(r: dict, out: Path) -> bool:
    return Path(r["done"]).is_file() if "done" in r else (out / f"{r['name']}.json").is_file()


# ----------------------------------------------------------------------------- the report


def intervals(per_seed: np.ndarray, ref: np.ndarray, close: np.ndarray, seed: int = 0) -> dict:
    """A row's score, its gap to the reference's and its closeness to the reference, each the mean
    over seeds with a 95 % percentile interval (resampling test examples, seeds averaged inside
    each resample). per_seed, close: [s, n] per-example values; ref: [n] the reference's."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, ref.shape[0], size=(RESAMPLES, ref.shape[0]))  # [B, n]
    score = per_seed[:, draws].mean(axis=(0, 2))  # [B]
    gap = score - ref[draws].mean(axis=1)
    near = close[:, draws].mean(axis=(0, 2))

    def stat(point: float, sample: np.ndarray) -> dict:
        lo, hi = np.percentile(sample, [2.5, 97.5])
        return {"value": float(point), "ci95": [float(lo), float(hi)]}

    return {"score": stat(per_seed.mean(), score), "gap_to_reference": stat(per_seed.mean() - ref.mean(), gap),
            "close": stat(close.mean(), near)}


def bootstrap(per_seed: np.ndarray, ref: np.ndarray, gold: np.ndarray, seed: int = 0) -> dict:
    """Accuracy, gap to the reference and agreement with it (`intervals`). per_seed: [s, n]
    predicted label ids; ref, gold: [n]."""
    correct, agree = (per_seed == gold).astype(float), (per_seed == ref).astype(float)  # [s, n]
    got = intervals(correct, (ref == gold).astype(float), agree, seed)
    return {"accuracy": got["score"], "gap_to_reference": got["gap_to_reference"], "agreement": got["close"],
            "per_seed_accuracy": correct.mean(1).tolist(), "per_seed_agreement": agree.mean(1).tolist()}


def summarize(name: str, task: dict, runs: Path, out: Path, dest: Path) -> dict:
    got = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    fit = json.loads((fit_folder(runs, task) / "fit.json").read_text())
    if "rouge_l" in got["reference"]:
        return summarize_generation(name, task, runs, got, fit, dest)
    labels = got["reference"]["labels"]
    ids = [p["id"] for p in got["reference"]["predictions"]]
    gold = np.array([labels.index(p["gold"]) for p in got["reference"]["predictions"]])

    def pred(row: str) -> np.ndarray:
        preds = got[row]["predictions"]
        assert [p["id"] for p in preds] == ids, f"{row}: another test set or order"
        return np.array([labels.index(p["label"]) for p in preds])

    ref = pred("reference")
    if task["seeds"] == "refit":
        seeds = [s for s in SEEDS if f"selected-seed{s}" in got]
        for s in seeds:  # each seed answered by the same setting (its own fit)
            assert got[f"selected-seed{s}"]["answered_by"] == got["selected-seed0"]["answered_by"], s
        selected, check = np.stack([pred(f"selected-seed{s}") for s in seeds]), None
    else:
        selected, check = selected_seeds(got, fit, labels)
    ft = json.loads((runs / task["reference"] / "icl_finetune.json").read_text())
    n_index = fit["labelled_records"]  # the fit was refitted on every record of the index
    table = {
        "selected": {"setting": fit["setting"], "seeds": list(SEEDS[:selected.shape[0]]), "answered_by": got["selected-seed0"]["answered_by"],
                     "trained_parameters": fit["trained_parameters"], "labelled_records": fit["labelled_records"],
                     **bootstrap(selected, ref, gold)},
        "reference": {"setting": "full fine-tune, zero-shot prompts", "seeds": [0],
                      "trained_parameters": ft["metrics"]["trainable_params"], "labelled_records": ft["metrics"]["n_train"],
                      "early_stopping_records": ft["metrics"]["n_eval"], "kept_step": ft["metrics"]["best_step"],
                      **bootstrap(ref[None], ref, gold)},
        "zero": {"setting": "zero-shot", "seeds": [0], "trained_parameters": 0, "labelled_records": 0,
                 **bootstrap(pred("zero")[None], ref, gold)},
        "knn-8": {"setting": "kNN-8 ICL", "seeds": [0], "trained_parameters": 0, "labelled_records": n_index,
                  **bootstrap(pred("knn-8")[None], ref, gold)},
    }
    randoms = [s for s in SEEDS if f"random-8-seed{s}" in got]
    if randoms:
        table["random-8"] = {"setting": "random-8 ICL", "seeds": randoms, "trained_parameters": 0,
                             "labelled_records": n_index,
                             **bootstrap(np.stack([pred(f"random-8-seed{s}") for s in randoms]), ref, gold)}
    sel = table["selected"]
    targets = {"within_2_points": abs(sel["gap_to_reference"]["value"]) <= 0.02,
               "agreement_at_least_90": sel["agreement"]["value"] >= 0.90,
               "agreement_ci_low_at_least_88": sel["agreement"]["ci95"][0] >= 0.88}
    report = {"task": name, "test_file": task["test"], "n": int(gold.shape[0]), "selected_on": fit["selected_on"],
              "seeds_made_by": task["seeds"],
              "selection_table": fit["table"], "validation": {k: v for k, v in fit["validation"].items() if k != "ids"},
              "rows": table, "targets": targets, "mixture_check": check, "resamples": RESAMPLES}
    return write_report(name, got, report, dest, lambda r: markdown(r, fit, ft))


def write_report(name: str, got: dict, report: dict, dest: Path, readme) -> dict:
    """The report with how it was run, written to dest as test.json and README.md (`readme(report)`),
    and the summary over every task again."""
    report.update(seconds={k: v.get("seconds") for k, v in got.items()},
                  machine=f"{platform.machine()}, {os.cpu_count()} cores, one torch thread per job",
                  command=f"python benchmarks/approximation.py {name} --runs RUNS --jobs 2")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "test.json").write_text(json.dumps(report, indent=1) + "\n")
    (dest / "README.md").write_text(readme(report) + "\n")
    write_summary(dest.parent)
    return report


def bootstrap_scores(per_seed: np.ndarray, ref: np.ndarray, sim: np.ndarray, seed: int = 0) -> dict:
    """Generation's figures (`intervals`): ROUGE-L, its gap to the reference's, and ROUGE-L against
    the reference's own outputs. per_seed, sim: [s, n] per-example scores in [0, 1]; ref: [n]."""
    got = intervals(per_seed, ref, sim, seed)
    return {"rouge_l": got["score"], "gap_to_reference": got["gap_to_reference"],
            "rouge_l_to_reference_outputs": got["close"], "per_seed_rouge_l": per_seed.mean(1).tolist()}


def summarize_generation(name: str, task: dict, runs: Path, got: dict, fit: dict, dest: Path) -> dict:
    """summarize for a generation task: ROUGE-L (best over an input's references) per example,
    recomputed here from the outputs, which test.json keeps with the references so that a test
    can recompute every figure."""
    examples = [{"input": p["input"], "references": p["references"]} for p in got["reference"]["predictions"]]

    def scored(name: str) -> tuple[list[str], np.ndarray]:
        """A row's outputs and their per-example ROUGE-L [n], checked against `icl eval`'s own mean."""
        preds = got[name]["predictions"]
        assert [p["input"] for p in preds] == [e["input"] for e in examples], f"{name}: another test set or order"
        outs = [p["output"] for p in preds]
        s = np.array([max(rouge_l_pair(o, r) for r in e["references"]) for o, e in zip(outs, examples)])
        assert abs(100 * s.mean() - got[name]["rouge_l"]) < 1e-6, name
        return outs, s

    ref_out, ref = scored("reference")

    def row(names: list[str], **info) -> dict:
        outs, per_seed = zip(*(scored(n) for n in names))
        sim = np.array([[rouge_l_pair(a, b) for a, b in zip(o, ref_out)] for o in outs])  # [s, n]
        return {**info, **bootstrap_scores(np.stack(per_seed), ref, sim), "outputs": list(outs)}

    seeds = [s for s in SEEDS if f"selected-seed{s}" in got]
    for s in seeds:
        assert got[f"selected-seed{s}"]["answered_by"] == got["selected-seed0"]["answered_by"], s
    ft = json.loads((runs / task["reference"] / "icl_finetune.json").read_text())
    n_index = fit["labelled_records"]
    randoms = [s for s in SEEDS if f"random-8-seed{s}" in got]
    table = {
        "selected": row([f"selected-seed{s}" for s in seeds], setting=fit["setting"], seeds=seeds,
                        answered_by=got["selected-seed0"]["answered_by"], trained_parameters=fit["trained_parameters"],
                        labelled_records=n_index),
        "reference": row(["reference"], setting="full fine-tune, zero-shot prompts", seeds=[0],
                         trained_parameters=ft["metrics"]["trainable_params"], labelled_records=ft["metrics"]["n_train"],
                         early_stopping_records=ft["metrics"]["n_eval"], kept_step=ft["metrics"]["best_step"]),
        "zero": row(["zero"], setting="zero-shot", seeds=[0], trained_parameters=0, labelled_records=0),
        "knn-8": row(["knn-8"], setting="kNN-8 ICL", seeds=[0], trained_parameters=0, labelled_records=n_index),
        **({"random-8": row([f"random-8-seed{s}" for s in randoms], setting="random-8 ICL", seeds=randoms,
                            trained_parameters=0, labelled_records=n_index)} if randoms else {}),
    }
    gap = table["selected"]["gap_to_reference"]["value"]
    targets = {"within_2_rouge_l": abs(gap) <= 0.02, "no_more_than_2_below": gap >= -0.02}
    index = ExampleIndex.load(runs / "indexes" / task["index"])
    inputs = {r.id: r.input for r in index.records}
    validation = {**{k: v for k, v in fit["validation"].items() if k != "ids"},
                  "inputs": len({inputs[i] for i in fit["validation"]["ids"]})}
    report = {"task": name, "test_file": task["test"], "n": len(examples), "metric": "rouge_l",
              "selected_on": fit["selected_on"], "seeds_made_by": task["seeds"], "fit_command": task["fit"],
              "selection_table": fit["table"], "validation": validation, "rows": table,
              "targets": targets, "resamples": RESAMPLES, "examples": examples}
    return write_report(name, got, report, dest, lambda r: markdown_generation(r, fit, ft))


def markdown_generation(r: dict, fit: dict, ft: dict) -> str:
    """A generation task's README, from test.json's own fields (ROUGE-L in points)."""
    v = r["validation"]
    lines = [f"# {r['task']}: the approximation protocol (docs/approximation.md)", "",
             f"Selection on a validation split V ({v['inputs']} inputs, {v['records']} records with all their "
             f"references, carved from the index with seed {v['seed']}; the test file not read), `{r['fit_command']}`: "
             "every candidate fitted on the rest of the index and scored on V by ROUGE-L against all references of "
             "an input.", "",
             *selection_lines(r, fit, "ROUGE-L", lambda x: f"{100 * x:.1f}"),
             "", f"## Test ({r['test_file']}, {r['n']} inputs, read once for these rows)", "",
              "Mean over the seeds listed; 95 % bootstrap intervals over test inputs "
              f"({r['resamples']:,} resamples, seeds averaged inside each). ROUGE-L: the best F1 over an input's "
              "references, in points. The last figure compares a row's outputs with the reference's own (shown, "
              "not a target).", "",
              "| row | seeds | ROUGE-L | gap to reference (points) | ROUGE-L to the reference's outputs | trained "
              "parameters | labelled records |", "|---|---|---|---|---|---:|---:|"]
    lines += row_lines(r, "rouge_l", "rouge_l_to_reference_outputs")
    sel, t = r["rows"]["selected"], r["targets"]
    lines += ["", f"Selected, per seed: ROUGE-L {', '.join(f'{100 * a:.1f}' for a in sel['per_seed_rouge_l'])}.",
              f"The reference: a full fine-tune (`icl finetune`), kept weights step {ft['metrics']['best_step']} of "
              f"{ft['metrics']['steps']} ({ft['metrics']['best_step'] / ft['metrics']['steps'] * ft['metrics']['epochs']:.2f}"
              f" of {ft['metrics']['epochs']:g} epochs; best held-out loss on its own {ft['metrics']['n_eval']}-record "
              f"slice), trained on {ft['metrics']['n_train']:,} records.", "",
              f"Target (docs/approximation.md): within 2 ROUGE-L of the reference: "
              f"{'met' if t['within_2_rouge_l'] else 'missed'} (gap {100 * sel['gap_to_reference']['value']:+.1f}); "
              f"no more than 2 below it: {'met' if t['no_more_than_2_below'] else 'missed'}.", "",
              seeds_sentence(r) + (" The selected setting trains nothing and draws nothing at random, so its seeds "
                                   "answer alike." if sel["trained_parameters"] == 0 else ""), "",
              f"Command: `{r['command']}` ({r['machine']}); per-row seconds are in test.json."]
    return "\n".join(lines)


def write_summary(root: Path) -> None:
    """summary.json: per task, the selected method and its test figures, from each task's test.json."""
    tasks = {}
    for path in sorted(root.glob("*/test.json")):
        r = json.loads(path.read_text())
        sel = r["rows"]["selected"]
        metric, close = ("rouge_l", "rouge_l_to_reference_outputs") if r.get("metric") == "rouge_l" \
            else ("accuracy", "agreement")
        tasks[path.parent.name] = {
            "selected": sel["setting"], "selected_on": r["selected_on"], "test_file": r["test_file"], "n": r["n"],
            "seeds": sel["seeds"], "trained_parameters": sel["trained_parameters"],
            "labelled_records": sel["labelled_records"], f"reference_{metric}": r["rows"]["reference"][metric],
            **{k: sel[k] for k in (metric, "gap_to_reference", close)}, "targets": r["targets"]}
    (root / "summary.json").write_text(json.dumps(tasks, indent=1) + "\n")


def markdown(r: dict, fit: dict, ft: dict) -> str:
    """The task's README: the selection on validation, then the test rows, from test.json's own fields."""
    v = r["validation"]
    lines = [f"# {r['task']}: the approximation protocol (docs/approximation.md)", "",
             f"Selection on a validation split V ({v['records']} records carved from the index with seed {v['seed']}; "
             f"the test file not read), `icl index fit {r['task']} --reference REF`: every candidate fitted on the rest "
             "of the index and scored on V.", "",
             *selection_lines(r, fit, "accuracy", lambda x: f"{x:.3f}"),
             "", f"## Test ({r['test_file']}, {r['n']} examples, read once for these rows)", "",
              "Mean over the seeds listed; 95 % bootstrap intervals over test examples "
              f"({r['resamples']:,} resamples, seeds averaged inside each).", "",
              "| row | seeds | accuracy % | gap to reference (points) | agreement with reference % | trained parameters "
              "| labelled records |", "|---|---|---|---|---|---:|---:|"]
    lines += row_lines(r, "accuracy", "agreement")
    sel, t = r["rows"]["selected"], r["targets"]
    lines += ["", f"Selected, per seed: accuracy {', '.join(f'{100 * a:.1f}' for a in sel['per_seed_accuracy'])}; "
              f"agreement {', '.join(f'{100 * a:.1f}' for a in sel['per_seed_agreement'])}.",
              f"The reference: a full fine-tune (`icl finetune`), kept weights step {ft['metrics']['best_step']} of "
              f"{ft['metrics']['steps']} (best held-out loss on its own {ft['metrics']['n_eval']}-record slice), "
              f"trained on {ft['metrics']['n_train']:,} records.", "",
              "Targets (docs/approximation.md): within 2 points of the reference: "
              f"{'met' if t['within_2_points'] else 'missed'}; agreement >= 90 %: "
              f"{'met' if t['agreement_at_least_90'] else 'missed'}; the agreement interval's lower end >= 88 %: "
              f"{'met' if t['agreement_ci_low_at_least_88'] else 'missed'}.", "",
              seeds_sentence(r), "",
              f"Command: `{r['command']}` ({r['machine']}); per-row seconds are in test.json."]
    return "\n".join(lines)


def row_lines(r: dict, score: str, close: str) -> list[str]:
    """The test table's rows: each row's score, gap to the reference and closeness to it, in points
    with their intervals (the reference's own gap and closeness are not shown)."""
    pct = lambda x: f"{100 * x['value']:.1f} [{100 * x['ci95'][0]:.1f}, {100 * x['ci95'][1]:.1f}]"  # noqa: E731
    lines = []
    for name, row in r["rows"].items():
        gap, near = ("–", "–") if name == "reference" else (pct(row["gap_to_reference"]), pct(row[close]))
        lines.append(f"| {name}: {row['setting']} | {', '.join(map(str, row['seeds']))} | {pct(row[score])} | "
                     f"{gap} | {near} | {row['trained_parameters']:,} | {row['labelled_records']:,} |")
    return lines


def selection_lines(r: dict, fit: dict, header: str, fmt) -> list[str]:
    """The validation table, best first (`fmt` writes a score), and what was selected and refitted."""
    lines = [f"| candidate (validation) | {header} | trained parameters | labelled records |", "|---|---:|---:|---:|"]
    for row in sorted(r["selection_table"], key=lambda x: -x["score"]):
        mark = " **(selected)**" if row["name"] == fit["setting"] else ""
        lines.append(f"| {row['name']}{mark} | {fmt(row['score'])} | {row['trained']:,} | {row['labelled']:,} |")
    return lines + ["", f"Selected: `{fit['setting']}` (ties go to fewer trained parameters, then the earlier "
                    f"setting), refitted on all {fit['labelled_records']:,} records: {fit['trained_parameters']:,} "
                    "trained parameters."]


def seeds_sentence(r: dict) -> str:
    if r["seeds_made_by"] == "refit":
        return ("Each seed of the selected row answers through the product path (`icl eval`, method auto): seeds 1 "
                "and 2 fit the same setting again with that seed on a copy of the index (`icl index fit --refit "
                "--seed S`; the anchors' context, a readout, a soft prompt's run; the validation split kept).")
    return ("Seeds 1 and 2 of the selected row mix the seed-0 run's kNN ICL answers (ICL draws nothing at random) "
            "with a readout over anchors built with that seed (`icl anchors build --seed S --readout linear`, their "
            "context drawn from the whole index; seed 0's, from the index less V). The mix is checked on seed 0 "
            f"against the product path: largest probability difference {r['mixture_check']['max_abs_prob_difference_seed0']:.1e}, "
            f"same labels: {r['mixture_check']['same_labels_seed0']}.")


def selected_seeds(got: dict, fit: dict, labels: list[str]) -> tuple[np.ndarray, dict]:
    """The selected setting's label ids [s, n] for every seed whose readout ran. Seed 0 comes from
    the product path; the others mix the same ICL answers with their own readout, and seed 0's mix
    is checked against the product path first (so the mix is the engine's)."""
    product = got["selected-seed0"]["predictions"]
    w = fit["options"]["anchor_weight"]
    assert fit["candidate"] == "icl+readout" and fit["options"]["calibration"] == "none", fit["setting"]
    ls = np.array([p["log_scores"] for p in product])  # [n, L] raw label log-likelihoods
    icl = np.exp(ls - np.logaddexp.reduce(ls, axis=1, keepdims=True))  # calibration none: normalised

    def mix(seed: int) -> np.ndarray:
        readout = np.array([[p["probs"][lab] for lab in labels] for p in got[f"readout-seed{seed}"]["predictions"]])
        return (1 - w) * icl + w * readout  # [n, L], as the engine mixes

    engine = np.array([[p["probs"][lab] for lab in labels] for p in product])
    check = {"max_abs_prob_difference_seed0": float(np.abs(mix(0) - engine).max()),
             "same_labels_seed0": bool((mix(0).argmax(1) == engine.argmax(1)).all())}
    assert check["same_labels_seed0"], check
    seeds = [s for s in SEEDS if f"readout-seed{s}" in got]
    return np.stack([engine.argmax(1) if s == 0 else mix(s).argmax(1) for s in seeds]), check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--runs", type=Path, required=True, help="the folder holding indexes/ and the reference")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("ICL_SHARED_DATA", HERE.parent.parent / "shared/data")))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--summarize", action="store_true", help="only write the report from the rows already run")
    ap.add_argument("--icl", default=str(HERE.parent / ".venv/bin/icl"))
    a = ap.parse_args()
    task = TASKS[a.task]
    out = a.runs / f"test-{a.task}"
    out.mkdir(parents=True, exist_ok=True)
    os.environ["ICL_SHARED_DATA"] = str(a.data.resolve())  # where a built-in split's name is read from
    if not a.summarize:
        test = a.data / task["test"]
        run(rows(task, a.runs.resolve(), out.resolve(), str(test.resolve()) if test.is_file() else task["test"]), out,
            a.icl, a.jobs)
    report = summarize(a.task, task, a.runs, out, HERE / "results/approximation" / a.task)
    rows_ = {k: {f: v for f, v in row.items() if f != "outputs"} for k, row in report["rows"].items()}
    print(json.dumps({"rows": rows_, "targets": report["targets"], "mixture_check": report.get("mixture_check")},
                     indent=1))


if __name__ == "__main__":
    main()
