"""CLI tests with Typer's runner: a tiny dataset, the hashing embedder and a tiny random LM saved
to a folder (so `--lm PATH` goes through the real loading code)."""

import json
import re

import pytest
from typer.testing import CliRunner

from icl_engine.apps.cli import app

from conftest import make_tiny_model, make_tiny_tokenizer

runner = CliRunner()

ROWS = [("a wonderful film", "positive"), ("great acting and a moving story", "positive"),
        ("a dull boring film", "negative"), ("terrible plot and bad acting", "negative"),
        ("the movie was great", "positive"), ("a boring waste of time", "negative")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": l}) for t, l in ROWS) + "\n")
    tok = make_tiny_tokenizer()
    lm_dir = root / "tiny-lm"
    make_tiny_model(len(tok)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    res = runner.invoke(app, ["index", "build", str(data), "--name", "tiny", "--embedder", "hashing:64",
                              "--indexes-dir", str(root / "indexes")])
    assert res.exit_code == 0, res.output
    return root, lm_dir


def run(args, root):
    return runner.invoke(app, [*args, "--indexes-dir", str(root / "indexes")])


def test_index_info_and_search(workspace):
    root, _ = workspace
    res = run(["index", "info", "tiny", "--json"], root)
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["count"] == len(ROWS) and info["labels"] == ["negative", "positive"]
    res = run(["index", "search", "tiny", "a boring film", "-k", "3", "--json"], root)
    hits = json.loads(res.stdout)
    assert [set(h) >= {"id", "score", "text", "label"} for h in hits] == [True] * 3
    assert hits[0]["score"] >= hits[-1]["score"]


def test_classify_and_eval(workspace):
    root, lm_dir = workspace
    res = run(["classify", "tiny", "a moving film", "--k", "2", "--lm", str(lm_dir), "--json"], root)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["label"] in ("negative", "positive") and len(out["demos"]) == 2
    assert sum(out["probs"].values()) == pytest.approx(1.0)
    test = root / "test.jsonl"
    test.write_text('{"text": "a great film", "label": "positive"}\n')
    res = run(["eval", "tiny", "--test", str(test), "--method", "random", "--k", "2", "--lm", str(lm_dir), "--json"], root)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert {"method", "k", "n", "accuracy", "seconds", "queries_per_s"} <= set(r) and r["n"] == 1


def test_generate_prints_its_demonstrations_from_either_kind_of_index(workspace, tmp_path):
    root, lm_dir = workspace
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"input": f"name: {c}", "output": f"{c} serves tea"}) + "\n" for c in "abc"))
    res = run(["index", "build", str(gen), "--name", "gen", "--embedder", "hashing:64"], root)
    assert res.exit_code == 0, res.output
    for name, demo in (("tiny", r" -> (positive|negative)$"), ("gen", r"name: [abc] -> [abc] serves tea$")):
        res = run(["generate", name, "a moving film", "--k", "2", "--max-new-tokens", "2", "--lm", str(lm_dir)], root)
        assert res.exit_code == 0, res.output
        shown = [line for line in res.stdout.splitlines() if line.startswith("  demo ")]
        assert len(shown) == 2 and all(re.search(demo, line) for line in shown), res.stdout


def test_bfloat16_flag_loads_the_lm_in_bfloat16_and_stays_close(workspace):
    root, lm_dir = workspace
    out = {}
    for dtype in ("float32", "bfloat16"):
        res = run(["classify", "tiny", "a moving film", "--k", "2", "--lm", str(lm_dir), "--dtype", dtype, "--json"], root)
        assert res.exit_code == 0, res.output
        out[dtype] = json.loads(res.stdout)
    assert [d["id"] for d in out["float32"]["demos"]] == [d["id"] for d in out["bfloat16"]["demos"]]
    diff = [abs(a - b) for a, b in zip(out["float32"]["log_scores"], out["bfloat16"]["log_scores"])]
    assert 0 < max(diff) < 0.1  # rounded weights: close, not equal


@pytest.mark.slow
def test_bounds_run_settings_and_their_mistakes(workspace, tmp_path):
    _, lm_dir = workspace
    res = runner.invoke(app, ["bounds", "run", "--experiment", "generation", "--quick", "--lm", str(lm_dir), "--out",
                              str(tmp_path), "--set", "draws=2", "--set", "vocab_sizes=[4]", "--set", "n_grid=[8, 16]",
                              "--set", "m=2"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "generation" / "results.json").read_text())
    assert saved["settings"]["draws"] == 2 and saved["settings"]["vocab_sizes"] == [4]
    for bad, match in ((["--set", "draws"], "KEY=VALUE"), (["--set", "drawz=2"], "unknown setting")):
        res = runner.invoke(app, ["bounds", "run", "--experiment", "generation", "--quick", "--lm", str(lm_dir),
                                  "--out", str(tmp_path), *bad])
        assert res.exit_code == 1 and match in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,match",
    [
        (["index", "info", "nope"], "nope"),
        (["index", "build", "missing.jsonl", "--name", "x"], "no such file"),
        (["classify", "tiny", "   ", "--lm", "LM"], "empty"),
        (["classify", "tiny", "a film", "--budget", "3", "--lm", "LM"], "budget"),
        (["eval", "tiny", "--test", "BADTEST", "--lm", "LM"], "not in the given label list"),
    ],
)
def test_user_mistakes_are_one_line_errors(workspace, args, match):
    root, lm_dir = workspace
    bad = root / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "meh"}\n')
    args = [str(lm_dir) if a == "LM" else str(bad) if a == "BADTEST" else a for a in args]
    res = run(args, root)
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert match in res.stderr


@pytest.mark.slow
def test_config_file_and_flag_precedence_through_the_installed_script(workspace, tmp_path, icl_forks):
    """`icl classify/generate/eval --config FILE`: the file's fields, then NAME and the options
    given on the command line (or their environment variable) override them; an option left out
    keeps the file's value, not its own default. Run as the user runs it: the console script (the
    first command line installed, the others in processes forked from a preloaded one, as
    tests/icl_forks.py says)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from icl_engine.core.config import PipelineConfig

    root, lm_dir = workspace
    icl = Path(sys.executable).with_name("icl")
    assert icl.is_file(), f"the console script is not installed beside {sys.executable}"
    cfg = tmp_path / "rt.json"
    PipelineConfig(index="ignored", indexes_dir=str(root / "indexes"), lm=str(lm_dir), k=1, method="random",
                   seed=3).save(cfg)
    env = {**os.environ, "ICL_INDEXES": ""}

    def icl_json(*args, installed=False):
        if installed:
            res = subprocess.run([str(icl), *args, "--json"], capture_output=True, text=True, env=env, timeout=300)
        else:
            res = icl_forks.run([*args, "--json"], cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    from_file = icl_json("classify", "tiny", "a moving film", "--config", str(cfg), installed=True)
    assert len(from_file["demos"]) == 1  # k from the file, not the option's default 8
    flag = icl_json("classify", "tiny", "a moving film", "--config", str(cfg), "--k", "2")
    assert len(flag["demos"]) == 2  # the option given wins
    knn = icl_json("classify", "tiny", "a moving film", "--config", str(cfg), "--method", "knn")
    nearest = icl_json("classify", "tiny", "a moving film", "--k", "1", "--lm", str(lm_dir), "--indexes-dir",
                       str(root / "indexes"))
    assert knn["demos"] == nearest["demos"]  # method from the flag, everything else the same
    test = root / "test.jsonl"
    test.write_text('{"text": "a great film", "label": "positive"}\n')
    r = icl_json("eval", "tiny", "--test", str(test), "--config", str(cfg))
    assert (r["method"], r["k"]) == ("random", 1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"index": "x", "kk": 1}')
    res = icl_forks.run(["classify", "tiny", "x", "--config", str(bad)], cwd=tmp_path, env=env)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "kk" in res.stderr


@pytest.mark.slow
def test_the_installed_script_freezes_the_heap_once_an_engine_is_loaded(workspace, tmp_path):
    """`icl eval` (the console script, in its own process) freezes the garbage collector's heap
    after loading the engine, so the full collections of a long run stop walking the LM's and the
    libraries' objects; a command that loads no engine leaves it alone. A sitecustomize on
    PYTHONPATH reports gc.get_freeze_count() as the process exits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, lm_dir = workspace
    icl = Path(sys.executable).with_name("icl")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print(f'FROZEN {gc.get_freeze_count()}', file=sys.stderr))\n")
    env = {**os.environ, "ICL_INDEXES": "", "PYTHONPATH": os.pathsep.join(
        [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    test = tmp_path / "test.jsonl"
    test.write_text('{"text": "a great film", "label": "positive"}\n')

    def frozen(*args) -> int:
        res = subprocess.run([str(icl), *args, "--indexes-dir", str(root / "indexes")], capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        return int(res.stderr.rsplit("FROZEN ", 1)[1].split()[0])

    assert frozen("eval", "tiny", "--test", str(test), "--k", "2", "--lm", str(lm_dir), "--json") > 100_000
    assert frozen("index", "info", "tiny", "--json") == 0
