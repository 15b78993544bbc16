"""Generation files as users have them, through the `icl` console script: a CommonGen-like
JSONL whose output field holds a list of references is indexed as one demonstration per
reference, kNN picks k distinct inputs, and BLEU/ROUGE-L score against all the references.
The index build and the first generate-file run use the installed script; the other command
lines run in processes forked from a preloaded one (tests/icl_forks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl_engine.core.index import ExampleIndex
from icl_engine.core.metrics import bleu, rouge_l

from conftest import make_tiny_model, make_tiny_tokenizer, said

ICL = Path(sys.executable).with_name("icl")
WORDS = ["dog", "frisbee", "catch", "cat", "sofa", "sleep", "boy", "ball", "kick", "girl", "kite", "fly", "man",
         "car", "drive", "woman", "bike", "ride"]
TRAIN = [{"input": ", ".join(WORDS[i:i + 3]),
          "output": [f"The {WORDS[i]} and the {WORDS[i + 1]} {WORDS[i + 2]}{'s' * j} together." for j in range(1 + i % 4)]}
         for i in range(0, 15)]
TEST = [{"input": "dog, ball, catch", "output": ["A dog catches the ball.", "The dog caught a ball in the park."]},
        {"input": "girl, kite", "output": ["A girl flies a kite."]},
        {"input": "man, bike, ride", "output": ["A man rides his bike.", "The man is riding a bike.",
                                                 "A man rides a bike down the road."]}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("genfiles")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok)).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    env = {**os.environ, "ICL_INDEXES": str(root / "indexes"), "ICL_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("ICL_LOG", None)
    out = icl(root, env, "index", "build", "train.jsonl", "--name", "cg", "--embedder", "hashing:64", "--json")
    assert out["kind"] == "generation" and out["count"] == sum(len(r["output"]) for r in TRAIN)  # one per reference
    return root, env


def icl(root: Path, env: dict, *args: str, as_json: bool = True, forks=None):
    """The command line through `forks` (icl_forks), else through the installed script."""
    if forks is not None:
        p = forks.run(args, cwd=root, env=env)
    else:
        assert ICL.is_file(), f"the console script is not installed beside {sys.executable}"
        p = subprocess.run([str(ICL), *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    # In a pipe: no tqdm bar (no carriage returns) and nothing said but the plain progress lines a
    # run that lasts past progress.QUIET_S prints (on a busy machine even a short one may).
    assert "\r" not in p.stderr and said(p.stderr) == [], p.stderr
    return json.loads(p.stdout) if as_json else p.stdout


@pytest.mark.slow
def test_eval_knn_picks_k_distinct_inputs_and_scores_against_all_references(work, icl_forks):
    root, env = work
    records = {r.id: r for r in ExampleIndex.load(root / "indexes" / "cg").records}
    assert not any(r.output.startswith("[") for r in records.values())  # not the string "['...']"
    lm = str(root / "lm")
    out = icl(root, env, "eval", "cg", "--test", "test.jsonl", "--method", "knn", "--k", "4", "--lm", lm,
              "--max-new-tokens", "6", "--json", "--predictions", "--log", "run.log", forks=icl_forks)
    assert out["n"] == len(TEST) and "fewer_demos" not in out
    for pred, row in zip(out["predictions"], TEST):
        inputs = [records[d].input for d in pred["demo_ids"]]
        assert len(inputs) == 4 and len(set(inputs)) == 4 and row["input"] not in inputs
        assert pred["references"] == row["output"]  # every reference kept for evaluation
    hyps, refs = [p["output"] for p in out["predictions"]], [r["output"] for r in TEST]
    assert out["bleu"] == pytest.approx(bleu(hyps, refs)) and out["rouge_l"] == pytest.approx(rouge_l(hyps, refs))
    assert (root / "run.log").is_file()  # --log: created at once; a run this short writes no line into it

    # --max-new-tokens reaches the decoder: greedy outputs of 2 tokens begin the outputs of 6
    short = icl(root, env, "eval", "cg", "--test", "test.jsonl", "--method", "knn", "--k", "4", "--lm", lm,
                "--max-new-tokens", "2", "--json", "--predictions", forks=icl_forks)
    pairs = [(s["output"], long) for s, long in zip(short["predictions"], hyps)]
    assert all(long.startswith(s) for s, long in pairs) and any(len(s) < len(long) for s, long in pairs)
    # --limit: the first N distinct inputs of the test file
    assert icl(root, env, "eval", "cg", "--test", "test.jsonl", "--k", "4", "--lm", lm, "--max-new-tokens", "2",
               "--limit", "2", "--json", forks=icl_forks)["n"] == 2


@pytest.mark.slow
def test_fewer_distinct_inputs_than_k_is_said(work, icl_forks):
    root, env = work
    lm = str(root / "lm")
    text = icl(root, env, "eval", "cg", "--test", "test.jsonl", "--k", "20", "--lm", lm, "--max-new-tokens", "2",
               as_json=False, forks=icl_forks)
    assert f"note: 3 of 3 queries had fewer than 20 demonstrations ({3 * (20 - len(TRAIN))} missing: the index " \
           "has no more distinct inputs" in text
    gen = icl(root, env, "generate", "cg", "boy, kite, fly", "--k", "20", "--lm", lm, "--max-new-tokens", "2",
              "--json", forks=icl_forks)
    assert gen["short"] == 20 - len(TRAIN) and len(gen["demos"]) + gen["dropped"] == len(TRAIN)
    assert len({d["input"] for d in gen["demos"]}) == len(gen["demos"])
    text = icl(root, env, "generate", "cg", "boy, kite, fly", "--k", "20", "--lm", lm, "--max-new-tokens", "2",
               as_json=False, forks=icl_forks)
    assert f"note: {20 - len(TRAIN)} demonstration(s) fewer than asked: the index has no more distinct inputs" in text
    hits = icl(root, env, "index", "search", "cg", "dog, frisbee", "-k", "5", "--json", forks=icl_forks)
    assert len({h["input"] for h in hits}) == 5  # a generation index's records: input + output


@pytest.mark.slow
def test_generate_file_equals_the_engine_and_resumes(work, icl_forks):
    """`icl generate-file`: an output and demonstration ids per input, equal to the single-process
    engine's greedy outputs; a re-run after a lost shard redoes only that shard. (On Ray:
    test_ray_pool.py.)"""
    from icl_engine.apps.shards import shard_path
    from icl_engine.core.config import PipelineConfig
    from icl_engine.core.engines import EngineCache

    root, env = work
    inputs = [r["input"] for r in TEST] + ["boy, kite, fly", "cat, sofa"]
    (root / "inputs.jsonl").write_text("".join(json.dumps({"input": t}) + "\n" for t in inputs))
    args = ("generate-file", "inputs.jsonl", "--index", "cg", "--out", "gen.jsonl", "--lm", str(root / "lm"), "--k", "4",
            "--max-new-tokens", "6", "--shard-size", "2", "--json")
    summary = icl(root, env, *args)
    assert (summary["texts"], summary["shards"], summary["resumed_shards"], summary["field"]) == (5, 3, 0, "input")
    rows = [json.loads(line) for line in (root / "gen.jsonl").read_text().splitlines()]
    config = PipelineConfig(index="cg", indexes_dir=str(root / "indexes"), lm=str(root / "lm"), k=4, max_new_tokens=6)
    engine = EngineCache(size=1).get(config)
    # shard by shard, as the command hands them over: the hashing embedder gives many demonstrations
    # the same score, and the index breaks such ties differently for one query than for a batch
    gens = [g for s in range(0, 5, 2) for g in engine.generate(inputs[s:s + 2], config.options)]
    assert [r["row"] for r in rows] == list(range(5)) and [r["input"] for r in rows] == inputs
    assert [r["output"] for r in rows] == [g.output for g in gens] and any(g.output for g in gens)
    assert [r["demo_ids"] for r in rows] == [[d.id for d in g.demos] for g in gens]
    assert [r["prompt_tokens"] for r in rows] == [g.prompt_tokens for g in gens]
    first = (root / "gen.jsonl").read_text()
    shard_path(root / "gen.jsonl.parts", 1).unlink()  # as if the run had died in shard 1
    assert icl(root, env, *args, forks=icl_forks)["resumed_shards"] == 2 and (root / "gen.jsonl").read_text() == first
