"""The public Python API: `import icl_engine` is light and names what a user needs; the README's
Python example runs as written (the packaged models: slow); `ICLClassifier` is a scikit-learn
classifier (cross_val_score, GridSearchCV, check_estimator where it applies)."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import SENTIMENT_ROWS, make_tiny_model, make_tiny_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_import_is_light_and_every_public_name_resolves():
    code = ("import sys, icl_engine as icl; light = 'torch' not in sys.modules; "
            "[getattr(icl, n) for n in icl.__all__]; print(light, len(icl.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) > 20
    import icl_engine

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        icl_engine.nope  # noqa: B018


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-lm")
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


def test_load_and_engine_of_a_spec(tmp_path, tiny_lm, monkeypatch):
    import json

    import icl_engine as icl

    monkeypatch.setenv("ICL_INDEXES", str(tmp_path / "indexes"))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in SENTIMENT_ROWS))
    icl.build_index(str(tmp_path / "r.jsonl"), "r", embedder="hashing:64")
    engine = icl.load("r", lm=tiny_lm)
    assert icl.load("r", lm=tiny_lm) is engine  # the process's one engine cache
    [a] = engine.classify(["a great film"], k=2)
    [b] = engine.classify(["a great film"], icl.QueryOptions(k=2))
    assert a == b and len(a.demo_ids) == 2 and a.demo_ids == [d.id for d in a.demos] and a.text == "a great film"
    direct = icl.Engine(icl.EngineSpec(index="r", lm=tiny_lm))  # Engine(spec) loads what the spec names
    assert direct is not engine and direct.classify(["a great film"], k=2)[0].label == a.label
    assert [h["id"] for h in icl.search("r", "a great film", k=2)] == list(reversed(a.demo_ids))


def test_iclclassifier_is_a_scikit_learn_classifier(tiny_lm):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.utils.estimator_checks import check_estimator

    import icl_engine as icl

    X, y = [t for t, _ in SENTIMENT_ROWS] * 2, [lab for _, lab in SENTIMENT_ROWS] * 2
    clf = icl.ICLClassifier(k=2, lm=tiny_lm, embedder="hashing:64")
    assert clone(clf).get_params() == clf.get_params() and clf.set_params(k=3).k == 3
    scores = cross_val_score(clf.set_params(k=2), X, y, cv=3)
    assert scores.shape == (3,) and all(0 <= s <= 1 for s in scores)
    fitted = clf.fit(X, y)
    proba = fitted.predict_proba(X[:4])
    assert proba.shape == (4, 2) and list(fitted.classes_) == ["negative", "positive"]
    assert list(fitted.predict(X[:4])) == [fitted.classes_[i] for i in proba.argmax(1)]
    assert fitted.score(X, y) == pytest.approx(sum(p == t for p, t in zip(fitted.predict(X), y)) / len(y))
    search = GridSearchCV(icl.ICLClassifier(lm=tiny_lm, embedder="hashing:64"), {"k": [1, 2]}, cv=3).fit(X, y)
    assert search.best_params_["k"] in (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checks that do not apply to text input say so as warnings
        results = check_estimator(icl.ICLClassifier(k=2, lm=tiny_lm, embedder="hashing:64"), on_fail=None)
    assert results and not [r["check_name"] for r in results if r["status"] == "failed"], sklearn.__version__
    with pytest.raises(ValueError, match="two classes"):
        icl.ICLClassifier(lm=tiny_lm, embedder="hashing:64").fit(["a", "b"], ["x", "x"])


def test_iclclassifier_cached_scoring_holds_its_cache_in_memory(tiny_lm, tmp_path, monkeypatch):
    """scoring="cached": fit runs every demonstration once and keeps the cache in memory (nothing is
    written); with one demonstration a cached block is exactly the prompt's, so the scores are exact's."""
    pytest.importorskip("sklearn")
    import numpy as np

    import icl_engine as icl

    from numerics import assert_scores_close

    monkeypatch.chdir(tmp_path)
    X, y = [t for t, _ in SENTIMENT_ROWS], [lab for _, lab in SENTIMENT_ROWS]
    args = {"lm": tiny_lm, "embedder": "hashing:64", "kv_dtype": "float32", "batch_size": 3}
    exact = icl.ICLClassifier(k=1, **args).fit(X, y)
    cached = icl.ICLClassifier(k=1, scoring="cached", **args).fit(X, y)
    got, want = cached._predictions(X), exact._predictions(X)
    assert [p.demo_ids for p in got] == [p.demo_ids for p in want]
    assert_scores_close([p.log_scores for p in got], [p.log_scores for p in want], tiny_lm)
    two = cached.set_params(k=2).predict_proba(X)  # blocks that do not read each other: not exact's
    assert np.abs(two - exact.set_params(k=2).predict_proba(X)).max() > 0 and np.allclose(two.sum(1), 1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a valid Scoring"):
        icl.ICLClassifier(scoring="fast", **args).fit(X, y)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path):
    """The README's Python block, as written, with the packaged SmolLM2 and MiniLM."""
    block = re.search(r"## Python\n.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README has no Python example under '## Python'"
    p = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "positive" in p.stdout or "negative" in p.stdout
    assert "Loading weights" not in p.stderr  # no library progress bars for a one-second load
