"""The stored cached-scoring results (benchmarks/results/kv_cache/) agree with themselves: every
figure the READMEs quote is read from these files, and each is recomputed here from what they
store (answers, counts)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

KV = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "kv_cache"
BENCH = sorted(KV.glob("**/results.json"))
PROBES = [p for p in BENCH if "runs" in json.loads(p.read_text())]
BENCH = [p for p in BENCH if p not in PROBES]


def count_of(fraction: float, n: int) -> bool:
    """Whether fraction is k / n for a whole k (an accuracy or agreement over n answers)."""
    return abs(fraction * n - round(fraction * n)) < 1e-6


@pytest.mark.skipif(not PROBES, reason="no stored kv_cache probes")
@pytest.mark.parametrize("path", PROBES, ids=lambda p: p.parent.name)
def test_probe_figures_follow_from_the_stored_answers(path):
    d = json.loads(path.read_text())
    gold, runs = d["gold"], d["runs"]
    n = len(gold)
    assert d["queries"]["n"] == n == len(d["rows"]) == len(set(d["rows"]))  # n distinct pool records
    exact = runs["exact-8"]["labels"]
    table = (path.parent / "README.md").read_text()
    for name, r in runs.items():
        assert len(r["labels"]) == n, name
        acc = np.mean([a == g for a, g in zip(r["labels"], gold)])
        agree = np.mean([a == e for a, e in zip(r["labels"], exact)])
        assert r["accuracy"] == pytest.approx(acc) and r["agreement_with_exact8"] == pytest.approx(agree), name
        assert r["agreement_se"] == pytest.approx(math.sqrt(agree * (1 - agree) / n)), name
        assert f"| {name} | {acc:.3f} | {agree:.3f} ({r['agreement_se']:.3f}) |" in table, name
    for pair, p in d.get("pairs", {}).items():  # order_probe: every pair of runs
        a, b = pair.split(" | ")
        agree = np.mean([x == y for x, y in zip(runs[a]["labels"], runs[b]["labels"])])
        assert p["agreement"] == pytest.approx(agree), pair


@pytest.mark.skipif(not BENCH, reason="no stored kv_cache benchmark")
@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.parent.name)
def test_benchmark_targets_follow_from_its_figures(path):
    for task, t in json.loads(path.read_text())["tasks"].items():
        n, methods, targets = t["test_queries"], t["methods"], t.get("targets")
        exact = methods["exact-8"]
        for name, m in methods.items():
            assert count_of(m["accuracy"], n), (task, name)
            if name != "exact-8":
                assert count_of(m["agreement_with_exact8"], n), (task, name)
                assert m["accuracy_minus_exact8"] == pytest.approx(m["accuracy"] - exact["accuracy"]), (task, name)
        if targets is None:  # a run without cached-8 (reuse/: forced budgets): the figures alone
            continue
        cached = methods["cached-8"]
        s, a, g = targets["k8_speedup"], targets["k8_accuracy_difference"], targets["k8_agreement"]
        assert s["value"] == cached["speedup_vs_exact8_median_of_blocks"] and s["met"] == (s["value"] >= 5)
        assert a["value"] == pytest.approx(cached["accuracy"] - exact["accuracy"])
        assert a["met"] == (abs(a["value"]) <= 0.01 + 1e-12)
        assert g["value"] == cached["agreement_with_exact8"] and g["met"] == (g["value"] >= 0.95)
        if "many_shot" in targets and targets["many_shot"]["best"]:
            ms = targets["many_shot"]
            best = methods[ms["best"]]
            assert int(ms["best"].split("-")[1]) >= 32
            assert ms["cpu_ms_per_query"] == best["cpu_ms_per_query"] <= exact["cpu_ms_per_query"]
            assert ms["met"] == (best["accuracy"] > exact["accuracy"])
            assert ms["beyond_two_se"] == (ms["accuracy_minus_exact8"] > 2 * ms["paired_se"])


@pytest.mark.skipif(not (KV / "bridge_probe" / "results.json").exists(), reason="no stored bridge probe")
def test_bridge_probe_gain_is_as_the_readme_says():
    """The README calls the bridge slots' agreement gain less than two paired standard errors."""
    d = json.loads((KV / "bridge_probe" / "results.json").read_text())
    runs, exact = d["runs"], d["runs"]["exact-8"]["labels"]
    bridged = next(r for name, r in runs.items() if "bridge" in name)["labels"]
    x = np.array([(b == e) - (c == e) for b, c, e in zip(bridged, runs["cached-8"]["labels"], exact)], float)
    gain, se = x.mean(), x.std(ddof=1) / math.sqrt(len(x))
    assert 0 < gain < 2 * se
    readme = (KV.parents[2] / "README.md").read_text()
    assert "less than two paired standard errors" in readme
    t = d["training"]
    assert f"{t['trained_parameters']:,} parameters" in readme.replace("\n", " ")
    assert f"{t['queries']} other" in readme and f"{round(t['train_cpu_s'])} CPU s" in readme.replace("\n", " ")
