"""Bad input through the `icl` console script, in real processes (an in-process runner hid a
traceback after every error): each case must exit 1 (or 2 for usage errors) with one line on
stderr and no traceback, and leave its working folder (the indexes, the data, any folder it was
pointed at) byte-identical. The corpus runs in processes forked from one that imported the CLI and
torch once (tests/icl_forks.py); a case of each kind also runs through the installed script."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import make_tiny_model, make_tiny_tokenizer, said

pytestmark = pytest.mark.slow  # the console script in subprocesses

ICL = Path(sys.executable).with_name("icl")
ROWS = [("a wonderful film", "positive"), ("great acting and a moving story", "positive"),
        ("a dull boring film", "negative"), ("terrible plot and bad acting", "negative")]
LONG = "x" * 300


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _soft_prompt(folder: Path, weights, **config) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    cfg = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "token_dim": 32, **config}
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    save_file({"prompt_embeddings": torch.as_tensor(weights, dtype=torch.float32)},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A working folder each case gets a fresh copy of: data files, indexes, soft prompts; and,
    outside it, a tiny LM and a broken one."""
    from icl_engine.apps import indexes as index_api
    from icl_engine.apps import training

    root = tmp_path_factory.mktemp("errors")
    w = root / "work"
    w.mkdir()
    _jsonl(w / "good.jsonl", [{"text": t, "label": lab} for t, lab in ROWS])
    _jsonl(w / "gen.jsonl", [{"input": t, "output": lab} for t, lab in ROWS])
    (w / "empty.jsonl").write_text("")
    _jsonl(w / "badjson.jsonl", ['{"text": "a", "label": "positive"}', '{"text": "b", "label": '])
    _jsonl(w / "array.jsonl", ['["a", "positive"]'])
    _jsonl(w / "nolabel.jsonl", [{"text": "a"}])
    _jsonl(w / "emptyfield.jsonl", [{"text": "", "label": "positive"}])
    _jsonl(w / "listlabel.jsonl", [{"text": "a", "label": ["positive"]}])
    _jsonl(w / "emptyrefs.jsonl", [{"input": "a", "output": ["x"]}, {"input": "b", "output": []}])
    _jsonl(w / "numrefs.jsonl", [{"input": "a", "output": ["x", 3]}])
    _jsonl(w / "dictlabel.jsonl", [{"text": "a", "label": {"y": 1}}])
    _jsonl(w / "floatlabel.jsonl", [{"text": "a", "label": 0.5}])
    _jsonl(w / "unknownlabel.jsonl", [{"text": "a", "label": "neutral"}])
    _jsonl(w / "clash.jsonl", [{"text": "a", "label": "a_b"}, {"text": "b", "label": "a-b"}])
    (w / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "positive"}\n')
    (w / "data.txt").write_text("a film\n")
    (w / "nofields.csv").write_text("a,b\n1,2\n")
    (w / "a_file").write_text("not a folder\n")
    _jsonl(w / "texts.jsonl", [{"text": t} for t, _ in ROWS])
    (w / "link.jsonl").symlink_to("texts.jsonl")
    _jsonl(w / "gen_inputs.jsonl", [{"input": t} for t, _ in ROWS])
    _jsonl(w / "withids.jsonl", [{"id": f"r{i}", "text": t, "label": lab} for i, (t, lab) in enumerate(ROWS)])
    (w / "extra.csv").write_text("text,label\na film,positive\nanother film,negative,surplus\n")
    _jsonl(w / "dupkeys.jsonl", ['{"text": "a film", "label": "positive", "label": "negative"}'])
    _jsonl(w / "zws.jsonl", [{"text": "a film", "label": "positive"}, {"text": "\u200b\u200b", "label": "negative"}])
    (w / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": "positive"}\n')
    (w / "bad_template.json").write_text('{"instruction": 3, "nonsense": true}')
    (w / "plain_template.json").write_text('{"input_format": "{input}\\nAnswer:", "output_format": " {output}"}')
    app = w / "app"  # the data-loss report: a project folder that happens to hold a manifest.json
    for sub in ("src", ".git"):
        (app / sub).mkdir(parents=True)
    (app / "manifest.json").write_text("{}")
    (app / ".env").write_text("SECRET=1\n")
    (app / "src" / "main.py").write_text("print('hi')\n")
    indexes = w / "indexes"
    index_api.build_index(str(w / "good.jsonl"), "good", embedder="hashing:64", indexes_dir=indexes)
    index_api.build_index(str(w / "gen.jsonl"), "gen", embedder="hashing:64", indexes_dir=indexes)
    index_api.build_index(str(w / "good.jsonl"), "broken", embedder="hashing:64", indexes_dir=indexes)
    _jsonl(w / "good2.jsonl", [{"text": t + " again", "label": lab} for t, lab in ROWS])
    index_api.build_index(str(w / "good2.jsonl"), "good2", embedder="hashing:64", indexes_dir=indexes)
    from icl_engine.core.index.store import current_version

    vectors = current_version(indexes / "broken") / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-8])  # truncated: refused on load
    _soft_prompt(w / "sp_nan", [[float("nan")] * 32] * 2)
    _soft_prompt(w / "sp_nokey", [[0.0] * 32] * 2, num_virtual_tokens=None)
    (w / "sp_corrupt").mkdir()
    (w / "sp_corrupt" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING",
                                                                       "num_virtual_tokens": 2, "token_dim": 32}))
    (w / "sp_corrupt" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")

    tok = make_tiny_tokenizer()
    lm = root / "tiny-lm"
    make_tiny_model(len(tok)).save_pretrained(lm)
    tok.save_pretrained(lm)
    training.build_anchors("good", out=w / "anchors_good", support=16, lm=str(lm), indexes_dir=indexes)
    broken_lm = root / "broken-lm"
    shutil.copytree(lm, broken_lm)
    (broken_lm / "config.json").write_text('{"model_type": "llama", ')
    return root, w, lm, broken_lm


def cases(lm: Path, broken_lm: Path) -> dict[str, list[str]]:
    """class of mistake -> the command line (run in a copy of the working folder)."""
    L = ["--lm", str(lm)]
    build = ["index", "build", "good.jsonl", "--embedder", "hashing:64"]
    return {
        # index names and places
        "info: no such index": ["index", "info", "nope"],
        "info: 300-character name": ["index", "info", LONG],
        "info: corrupt index": ["index", "info", "broken"],
        "search: no such index": ["index", "search", "nope", "a film"],
        "search: k = 0": ["index", "search", "good", "a film", "-k", "0"],
        "build: name ../x": [*build, "--name", "../x"],
        "build: name a/b": [*build, "--name", "a/b"],
        "build: absolute name": [*build, "--name", "/tmp/icl-should-not-exist"],
        "build: name of a foreign folder": [*build, "--name", "./app"],
        "build: hidden name": [*build, "--name", ".hidden"],
        "build: option-like name": [*build, "--name=-rf"],
        "build: 300-character name": [*build, "--name", LONG],
        "build: existing index without --force": [*build, "--name", "good"],
        "build: foreign folder as --indexes-dir/name": [*build, "--name", "app", "--indexes-dir", "."],
        "build: --indexes-dir is a file": [*build, "--name", "x", "--indexes-dir", "a_file"],
        "build: --indexes-dir below a file": [*build, "--name", "x", "--indexes-dir", "a_file/sub"],
        "build: missing --name": build,
        # data files
        "build: missing data file": ["index", "build", "missing.jsonl", "--name", "x"],
        "build: empty file": ["index", "build", "empty.jsonl", "--name", "x"],
        "build: invalid JSON line": ["index", "build", "badjson.jsonl", "--name", "x"],
        "build: JSON array row": ["index", "build", "array.jsonl", "--name", "x"],
        "build: missing label field": ["index", "build", "nolabel.jsonl", "--name", "x"],
        "build: empty field": ["index", "build", "emptyfield.jsonl", "--name", "x"],
        "build: list label": ["index", "build", "listlabel.jsonl", "--name", "x"],
        "build: empty reference list": ["index", "build", "emptyrefs.jsonl", "--name", "x"],
        "build: reference list holding a number": ["index", "build", "numrefs.jsonl", "--name", "x"],
        "build: object label": ["index", "build", "dictlabel.jsonl", "--name", "x"],
        "build: float label": ["index", "build", "floatlabel.jsonl", "--name", "x"],
        "build: not UTF-8": ["index", "build", "latin1.jsonl", "--name", "x"],
        "build: unknown file type": ["index", "build", "data.txt", "--name", "x"],
        "build: CSV without known fields": ["index", "build", "nofields.csv", "--name", "x"],
        "build: unknown --text-field": [*build, "--name", "x", "--text-field", "body"],
        "build: labels that read the same as words": ["index", "build", "clash.jsonl", "--name", "x"],
        "build: --auto-template with a missing LM": [*build, "--name", "x", "--auto-template", "--lm", "./no-lm"],
        "build: unknown index type": [*build, "--name", "x", "--index-type", "btree"],
        "build: unloadable embedder": ["index", "build", "good.jsonl", "--name", "x", "--embedder", "./no-model"],
        "build: missing template file": [*build, "--name", "x", "--template", "nope.json"],
        "build: invalid template": [*build, "--name", "x", "--template", "bad_template.json"],
        "build: a CSV row with more cells than the header": ["index", "build", "extra.csv", "--name", "x"],
        "build: text and label from one field": [*build, "--name", "x", "--text-field", "text", "--label-field", "text"],
        "build: a JSON key twice in a row": ["index", "build", "dupkeys.jsonl", "--name", "x"],
        "build: a text of zero-width spaces": ["index", "build", "zws.jsonl", "--name", "x"],
        "build: a device, not a file": ["index", "build", "/dev/zero", "--name", "x"],
        "build: JSON nested 100,000 deep": ["index", "build", "deep.jsonl", "--name", "x"],
        "add: --id-field on an index of content-hash ids": ["index", "add", "good", "withids.jsonl", "--id-field", "id"],
        "search: a blank query": ["index", "search", "good", "   "],
        "delete: foreign folder": ["index", "delete", "app", "--indexes-dir", "."],
        "delete: no such index": ["index", "delete", "nope"],
        # queries, models, soft prompts
        "classify: empty query": ["classify", "good", "  ", *L],
        "classify: generation index": ["classify", "gen", "a film", *L],
        "classify: k < 0": ["classify", "good", "a film", "--k", "-1", *L],
        "classify: budget 0": ["classify", "good", "a film", "--budget", "0", *L],
        "classify: missing LM folder": ["classify", "good", "a film", "--lm", "./no-such-lm"],
        "classify: LM with broken config.json": ["classify", "good", "a film", "--lm", str(broken_lm)],
        "classify: missing soft prompt": ["classify", "good", "a film", *L, "--soft-prompt", "nope"],
        "classify: corrupt safetensors": ["classify", "good", "a film", *L, "--soft-prompt", "sp_corrupt"],
        "classify: NaN soft prompt": ["classify", "good", "a film", *L, "--soft-prompt", "sp_nan"],
        "classify: adapter key missing": ["classify", "good", "a film", *L, "--soft-prompt", "sp_nokey"],
        "classify: unknown dtype": ["classify", "good", "a film", *L, "--dtype", "int3"],
        "classify-file: --out is the input": ["classify-file", "texts.jsonl", "--index", "good", "--out",
                                              "texts.jsonl", *L],
        "classify-file: --out is a link to the input": ["classify-file", "texts.jsonl", "--index", "good", "--out",
                                                        "link.jsonl", *L],
        "classify-file: --out inside the index": ["classify-file", "texts.jsonl", "--index", "good", "--out",
                                                  "indexes/good/out.jsonl", *L],
        "classify-file: no such index (no parts left)": ["classify-file", "texts.jsonl", "--index", "nope", "--out",
                                                         "o.jsonl", *L],
        "classify-file: an LM that does not load (no parts left)": ["classify-file", "texts.jsonl", "--index",
                                                                    "good", "--out", "o.jsonl", "--lm", "./no-lm"],
        "generate-file: --out is the input": ["generate-file", "gen_inputs.jsonl", "--index", "gen", "--out",
                                              "gen_inputs.jsonl", *L],
        "eval: missing test file": ["eval", "good", "--test", "missing.jsonl", *L],
        "eval: unknown test label": ["eval", "good", "--test", "unknownlabel.jsonl", *L],
        "eval: unknown method": ["eval", "good", "--test", "good.jsonl", "--method", "magic", *L],
        "eval: --log in a missing folder": ["eval", "gen", "--test", "gen.jsonl", "--log", "nofolder/run.log", *L],
        "eval: --max-new-tokens 0": ["eval", "gen", "--test", "gen.jsonl", "--max-new-tokens", "0", *L],
        "tune: --out is a file": ["tune", "good", "--out", "a_file", "--steps", "1", *L],
        "finetune: --out is a file": ["finetune", "good", "--out", "a_file", "--steps", "1", *L],
        "finetune: --out is a foreign folder (even with --resume)": ["finetune", "good", "--out", "app", "--steps",
                                                                     "1", "--resume", *L],
        "tune: --out is a foreign folder": ["tune", "good", "--out", "anchors_good", "--steps", "1", *L],
        "tune: --distill-from a folder that is no reference": ["tune", "good", "--out", "sp_new", "--steps", "1",
                                                              "--distill-from", "anchors_good", *L],
        "tune: --alpha 2": ["tune", "good", "--out", "sp_new", "--distill-from", "anchors_good", "--alpha", "2", *L],
        # kNN prompting's anchors
        "anchors: --out is a foreign folder": ["anchors", "build", "good", "--out", "app", *L],
        "anchors: --out holds anchors, no --force": ["anchors", "build", "good", "--out", "anchors_good", *L],
        "anchors: --out is a file": ["anchors", "build", "good", "--out", "a_file", *L],
        "classify: --anchors not an anchors folder": ["classify", "good", "a film", "--anchors", "app", *L],
        "classify: anchors for another template": ["classify", "good", "a film", "--anchors", "anchors_good",
                                                   "--template", "plain_template.json", *L],
        "classify: anchors for another index": ["classify", "good2", "a film", "--anchors", "anchors_good", *L],
        "classify: --anchor-k beyond the anchors": ["classify", "good", "a film", "--anchors", "anchors_good",
                                                    "--anchor-k", "99", *L],
        "eval: --anchor-weight 0": ["eval", "good", "--test", "good.jsonl", "--anchors", "anchors_good",
                                    "--anchor-weight", "0", *L],
        "bounds: draws not a number": ["bounds", "run", "--experiment", "linear", "--quick", "--set", 'draws="two"',
                                       "--out", "bounds_out", *L],
        "bounds: unknown experiment": ["bounds", "run", "--experiment", "nope", "--out", "bounds_out", *L],
        "bounds theory: negative eps": ["bounds", "theory", "--eps", "-1"],
        "serve: unknown --index": ["serve", "--index", "nope", *L],
        "serve: --index a path": ["serve", "--index", "../indexes/good", *L],
        "serve: port out of range": ["serve", "--port", "70000", *L],
        "unknown command": ["frobnicate"],
        "unknown option": ["index", "info", "good", "--colour"],
    }


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> a hash of its contents (folders and links marked)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _installed_script(args, *, cwd, env, timeout):
    return subprocess.run([str(ICL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _run_case(name: str, args: list[str], root: Path, work: Path, run=_installed_script, tag: str = "") -> str | None:
    """None when the case behaved, else what went wrong. `run` runs the command line (by default
    the installed script; else a subprocess.run-like function such as icl_forks.run)."""
    case = root / "cases" / hashlib.sha1((tag + name).encode()).hexdigest()[:10]
    shutil.copytree(work, case, symlinks=True)
    before = _snapshot(case)
    env = {**os.environ, "ICL_INDEXES": str(case / "indexes"), "ICL_CACHE": str(root / "cache"),
           "HF_HUB_OFFLINE": "1", "ICL_LOCK_TIMEOUT": "5"}
    env.pop("ICL_DEBUG", None)
    p = run(args, cwd=case, env=env, timeout=300)
    err = said(p.stderr)  # long work may print progress lines first
    problems = []
    if p.returncode not in (1, 2):
        problems.append(f"exit {p.returncode}")
    if len(err) != 1 or not err[0].startswith("error: ") or "Traceback" in p.stderr:
        problems.append(f"stderr {p.stderr[-600:]!r}")
    if _snapshot(case) != before:
        problems.append("the working folder changed")
    if Path("/tmp/icl-should-not-exist").exists():
        problems.append("wrote outside the working folder")
    return f"{name}: {'; '.join(problems)}" if problems else None


def test_bad_input_corpus_gives_one_line_and_changes_nothing(base, icl_forks):
    root, work, lm, broken_lm = base
    corpus = cases(lm, broken_lm)
    assert len(corpus) >= 40
    with ThreadPoolExecutor(max_workers=2) as pool:  # copies and snapshots overlap; the forks take turns
        results = list(pool.map(lambda kv: _run_case(*kv, root, work, icl_forks.run), corpus.items()))
    failures = [r for r in results if r]
    assert not failures, f"{len(failures)} of {len(corpus)} classes misbehaved:\n" + "\n".join(failures)


# One case of each kind through the installed script: a usage error, a bad name, a bad data file,
# one that imports torch and loads the LM before it fails (a damaged soft prompt), and an embedder
# that does not load.
INSTALLED = ("unknown option", "build: name ../x", "build: invalid JSON line", "classify: NaN soft prompt",
             "build: unloadable embedder")


def test_bad_input_through_the_installed_script(base):
    root, work, lm, broken_lm = base
    corpus = cases(lm, broken_lm)
    assert ICL.is_file(), f"the console script is not installed beside {sys.executable}"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda name: _run_case(name, corpus[name], root, work, tag="installed"), INSTALLED))
    failures = [r for r in results if r]
    assert not failures, "\n".join(failures)


def test_usage_errors_exit_2_and_user_errors_exit_1(base):
    root, work, lm, _ = base
    env = {**os.environ, "ICL_INDEXES": str(work / "indexes")}
    usage = subprocess.run([str(ICL), "index", "info"], cwd=work, env=env, capture_output=True, text=True)
    user = subprocess.run([str(ICL), "index", "info", "nope"], cwd=work, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("error: Missing argument")
    assert user.returncode == 1 and user.stderr.strip().endswith("no such index folder")
    debug = subprocess.run([str(ICL), "index", "info", "nope"], cwd=work, capture_output=True, text=True,
                           env={**env, "ICL_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # the traceback, when asked for


def test_budget_that_leaves_demonstrations_out_says_so(base, icl_forks):
    root, work, lm, _ = base
    env = {**os.environ, "ICL_INDEXES": str(work / "indexes"), "ICL_CACHE": str(root / "cache")}
    plain = ["--template", "plain_template.json"]  # the budget below is sized for it
    args = ["classify", "good", "a moving film", "--k", "4", "--budget", "50", "--lm", str(lm), *plain]
    p = icl_forks.run([*args, "--json"], cwd=work, env=env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert len(out["demos"]) == 1 and out["dropped"] == 3 and out["skipped"] == []  # was: 1 demo, "skipped": []
    p = icl_forks.run(args, cwd=work, env=env)
    assert p.returncode == 0, p.stderr
    assert "note: 3 more demonstration(s) left out: the token budget was full" in p.stdout


def test_out_that_is_a_hard_link_to_the_input_is_refused(base, tmp_path):
    """A hard link is the input under another name (one inode): refused, the input unchanged."""
    root, work, lm, _ = base
    case = tmp_path / "case"
    shutil.copytree(work, case, symlinks=True)
    os.link(case / "texts.jsonl", case / "hard.jsonl")
    before = (case / "texts.jsonl").read_bytes()
    env = {**os.environ, "ICL_INDEXES": str(case / "indexes"), "ICL_CACHE": str(root / "cache")}
    for command, src, index in (("classify-file", "texts.jsonl", "good"), ("generate-file", "texts.jsonl", "gen")):
        p = subprocess.run([str(ICL), command, src, "--index", index, "--out", "hard.jsonl", "--lm", str(lm)],
                           cwd=case, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and p.stderr.startswith("error: --out hard.jsonl is the input file"), p.stderr
    assert (case / "texts.jsonl").read_bytes() == before and not (case / "hard.jsonl.parts").exists()
