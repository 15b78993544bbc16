"""Plain-text presentation for the CLI: each function turns what a library call returned (a
JSON-ready dict or list) into the lines `icl` prints. The library never formats for a terminal."""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_update", "format_info", "format_hits", "format_prediction", "format_generation", "format_eval", "format_demo",
           "format_table", "format_fit"]


def format_info(info: dict) -> str:
    keys = ["name", "path", "count", "kind", "labels", "embedder", "dim", "index_type", "created", "version",
            "version_created"]
    lines = [f"{k.replace('_', ' '):>15}: {info[k]}" for k in keys if info.get(k) is not None]
    if info.get("index_params"):  # the settings the index was built with (nlist, nprobe, ...)
        lines.append(f"{'settings':>15}: " + ", ".join(f"{k}={v}" for k, v in sorted(info["index_params"].items())))
    t = info.get("template")
    if t:  # what a query's prompt looks like
        lines.append(f"{'template':>15}: " + " | ".join(f"{k} {t[k]!r}" for k in ("instruction", "input_format",
                                                                                 "output_format") if t.get(k)))
    if "template_source" in info:
        lines.append(f"{'template from':>15}: {info['template_source']}")
    lines += [f"{'note':>15}: {n}" for n in info.get("template_notes", [])]
    for step in info.get("lineage", [])[1:]:  # the build is `created`; then each add / remove
        what = ", ".join(f"{step[k]} {k}" for k in ("added", "replaced", "removed") if step.get(k))
        lines.append(f"{'update':>15}: {step['at']}: {what or 'no change'} -> {step['count']} records")
    return "\n".join(lines)


def format_update(r: dict) -> str:
    """`icl index add/remove`: what changed and the version now current."""
    parts = [f"{r[k]} {k}" for k in ("added", "replaced", "unchanged", "removed") if r.get(k)]
    changed = r["version"] != r["previous"]
    out = (f"{r['name']}: {', '.join(parts) or 'nothing to do'}; {r['count']} records"
           + (f" (new version {r['version']})" if changed else " (unchanged)"))
    ids = r.get("ids")
    if ids:  # what `index remove --ids` takes, in the order of the file
        out += f"\nids: {', '.join(ids[:10])}" + (f", ... ({len(ids)} in all; --json lists them)" if len(ids) > 10 else "")
    return out


def format_template_search(r: dict) -> str:
    """The candidates' table: held-out score, cost, the winner marked."""
    lines = [f"template search: {r['n_validation']} held-out examples, {r['metric']}, {r['seconds']:.0f} s", "",
             f"| candidate | {r['metric']} | seconds | instruction | input format |", "|---|---|---|---|---|"]
    for c in r["candidates"]:
        score = "n/a" if c["score"] is None else f"{c['score']:.3f}"
        mark = " (chosen)" if c["name"] == r["best"] else ""
        t = c["template"]
        lines.append(f"| {c['name']}{mark} | {score} | {c['seconds']:.0f} | {t['instruction'][:60]!r} | "
                     f"{t['input_format']!r} |")
    lines += [f"note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)


def format_hits(hits: list[dict]) -> str:
    """Search hits: a classification index's records are text + label, a generation index's input + output."""
    return "\n".join(f"{h['score']:.3f}  [{h['label']}]  {h['text']}" if "label" in h else
                     f"{h['score']:.3f}  {h['input']} -> {h['output']}" for h in hits)


def format_prediction(p: dict) -> str:
    probs = "  ".join(f"{lab}={x:.3f}" for lab, x in p["probs"].items())
    lines = [f"label: {p['label']}   ({probs}; {p['prompt_tokens']} prompt tokens)"]
    lines += [f"  demo {d['score']:.3f} [{d['label']}] {d['text']}" for d in p["demos"]]
    return "\n".join(lines + _budget_note(p))


def _budget_note(p: dict) -> list[str]:
    """Nothing is left out silently: say what the token budget cost, and when the index had too
    few distinct inputs for k."""
    notes = []
    if p.get("short"):
        notes.append(f"{p['short']} demonstration(s) fewer than asked: the index has no more distinct inputs")
    if p.get("dropped"):
        notes.append(f"{p['dropped']} more demonstration(s) left out: the token budget was full")
    if p.get("skipped"):
        notes.append(f"{len(p['skipped'])} demonstration(s) skipped: each alone is longer than the budget")
    return [f"  note: {n}" for n in notes]


def format_generation(g: dict) -> str:
    lines = [g["output"], f"({g['prompt_tokens']} prompt tokens)"]
    # a generation index's demonstrations are input -> output pairs; a classification index's,
    # text and label (generation from one is allowed: its labels are the outputs)
    lines += [f"  demo {d['score']:.3f} {d['input']} -> {d['output']}" if "input" in d else
              f"  demo {d['score']:.3f} {d['text']} -> {d['label']}" for d in g["demos"]]
    return "\n".join(lines + _budget_note(g))


def format_eval(r: dict) -> str:
    out = [format_table([r]), f"{r['seconds']:.1f} s"]
    f = r.get("fewer_demos")
    if f:  # never silent: queries that got fewer than k demonstrations, and why
        why = [f"{f['short']} missing: the index has no more distinct inputs" if f["short"] else "",
               f"{f['dropped']} left out: the token budget was full" if f["dropped"] else "",
               f"{f['skipped']} skipped: each alone is longer than the budget" if f["skipped"] else ""]
        out.append(f"note: {f['queries']} of {r['n']} queries had fewer than {r['k']} demonstrations "
                   f"({'; '.join(w for w in why if w)})")
    if "confusion_matrix" in r:
        width = max(len(lab) for lab in r["labels"])
        out.append("confusion (rows gold, columns predicted):")
        out += [f"  {lab:>{width}}  " + " ".join(f"{c:5d}" for c in row) for lab, row in zip(r["labels"], r["confusion_matrix"])]
    return "\n".join(out)


def format_demo(d: dict) -> str:
    """queries.run_demo's result: the index and anchors it used, the four rows, one example."""
    idx, anc, ex = d["index"], d["anchors"], d["example"]
    lines = [f"index: {'built' if idx['built'] else 'reusing'} {idx['path']} ({idx['count']:,} reviews: {idx['data']})",
             f"anchors: {'built' if anc['built'] else 'reusing'} {anc['path']} (a linear readout of "
             f"{anc['trained_parameters']:,} parameters fitted on {anc['labelled_records']:,} labelled records)", "",
             format_table(d["rows"]), "", f"example: {ex['input']!r} (gold: {ex['gold']})",
             format_prediction(ex["prediction"]), "",
             "the full Rotten Tomatoes figures and how the method is chosen: benchmarks/results/approximation/rt",
             "your own data: icl index build FILE.jsonl --name NAME [--auto-template], "
             "then icl eval NAME --test TEST.jsonl (see the README)"]
    return "\n".join(lines)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of evaluation results (one row per evaluate() call)."""
    gen = "bleu" in rows[0]
    head = ["answered by", "k", "calibration", "n"] + (["BLEU", "ROUGE-L"] if gen else ["accuracy", "macro-F1"]) + ["q/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        metrics = [f"{r['bleu']:.2f}", f"{r['rouge_l']:.2f}"] if gen else [f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}"]
        lines.append("| " + " | ".join([r.get("answered_by", r["method"]), str(r["k"]), r["calibration"], str(r["n"]),
                                       *metrics, f"{r['queries_per_s']:.2f}"]) + " |")
    return "\n".join(lines)


def format_fit(fit: dict) -> str:
    """`icl index fit`: every candidate's validation score, the one chosen, what it trained."""
    metric = fit["metric"]
    lines = [f"validation: {fit['validation']['records']} held-out {'records' if metric == 'accuracy' else 'inputs'} "
             f"(seed {fit['validation']['seed']}), {metric}", "", f"| candidate | {metric} | trained parameters |",
             "|---|---:|---:|"]
    for row in sorted(fit["table"], key=lambda r: -r["score"]):
        mark = " (chosen)" if row["name"] == fit["setting"] else ""
        lines.append(f"| {row['name']}{mark} | {row['score']:.3f} | {row['trained']:,} |")
    lines += ["", f"attached to {fit['name']} (version {fit['index_version']}): {fit['setting']}; trained "
              f"{fit['trained_parameters']:,} parameters on {fit['labelled_records']:,} labelled records"
              f"{' and ' + format(fit['reference_labels'], ',') + ' reference labels' if fit.get('reference_labels') else ''}",
              f"queries answer with it by default (--method auto); {fit['path']}"]
    return "\n".join(lines)
