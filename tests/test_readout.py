"""The linear readout over kNN prompting's anchors: it learns a linearly separable labelling, its
probabilities are the formula's, it round-trips through its files and refuses other anchors or
torn files, and `icl anchors build --readout linear` + `icl classify --anchor-readout linear`
(the installed console script) give the library's probabilities."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from icl_engine.core.knn_prompt import AnchorError, Anchors
from icl_engine.core.readout import DEFAULT_L2_GRID, READOUT_TENSORS, LinearReadout, fit_readout

from conftest import said
from numerics import lm_rtol

ICL = Path(sys.executable).with_name("icl")


def synthetic_anchors(n=400, s=17, n_labels=3, seed=0) -> Anchors:
    """Features that look like log-probs; labels a linear function of them (separable)."""
    rng = np.random.default_rng(seed)
    logp = np.log(rng.dirichlet(np.ones(s), size=n)).astype(np.float32)  # [n, s]
    labels = np.argmax(logp @ rng.normal(size=(s, n_labels)), axis=1).astype(np.int64)
    manifest = {"lm": "x", "labels": [f"l{i}" for i in range(n_labels)], "index_sha256": "abc"}
    return Anchors(logp, np.arange(s - 1, dtype=np.int64), labels, tuple(manifest["labels"]),
                   tuple(f"r{i}" for i in range(n)), (), manifest)


def test_it_learns_a_separable_labelling_and_predicts_by_the_formula():
    anchors = synthetic_anchors()
    readout = fit_readout(anchors)
    assert readout.info["l2"] in DEFAULT_L2_GRID and set(readout.info["heldout_accuracy"]) == {str(x) for x in DEFAULT_L2_GRID}
    probs = readout.predict(anchors.logp)  # [n, L]
    assert probs.shape == (400, 3) and np.allclose(probs.sum(1), 1.0)
    assert np.mean(probs.argmax(1) == anchors.labels) >= 0.95
    z = ((anchors.logp.astype(np.float64) - readout.mean) / readout.std) @ readout.weight + readout.bias
    want = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert np.allclose(probs, want, atol=1e-10)
    # fitted to other labels (e.g. a reference's), it follows those
    other = (anchors.labels + 1) % 3
    assert np.mean(fit_readout(anchors, other, label_source="reference").predict(anchors.logp).argmax(1) == other) >= 0.95


def test_files_round_trip_and_refusals(tmp_path):
    anchors = synthetic_anchors()
    readout = fit_readout(anchors)
    with pytest.raises(AnchorError, match="holds no linear readout.*--readout linear"):
        LinearReadout.load(tmp_path, anchors)
    readout.save(tmp_path)
    back = LinearReadout.load(tmp_path, anchors)
    assert np.array_equal(back.predict(anchors.logp), readout.predict(anchors.logp))
    assert back.info["label_source"] == "gold"
    other = replace(anchors, manifest={**anchors.manifest, "index_sha256": "def"})  # anchors of another index
    with pytest.raises(AnchorError, match="fitted to other anchors"):
        LinearReadout.load(tmp_path, other)
    data = bytearray((tmp_path / READOUT_TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / READOUT_TENSORS).write_bytes(bytes(data))
    with pytest.raises(AnchorError, match="does not match readout.json"):
        LinearReadout.load(tmp_path, anchors)
    with pytest.raises(AnchorError, match="400 indices into 3 labels"):
        fit_readout(anchors, np.full(400, 3))


@pytest.mark.slow
def test_the_console_script_fits_and_uses_it(classify_job, tmp_path):
    """Through the installed `icl`: anchors with a readout, then classify reads the readout."""
    from icl_engine.core.config import PipelineConfig
    from icl_engine.core.engines import get_engine

    root, _, config, _ = classify_job
    common = ["--lm", config.lm, "--indexes-dir", str(root / "indexes")]
    out = tmp_path / "anchors"
    p = subprocess.run([str(ICL), "anchors", "build", "tiny", "--out", str(out), "--support", "64", "--readout",
                        "linear", *common], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["readout"]["label_source"] == "gold"
    text = "a great film"
    p = subprocess.run([str(ICL), "classify", "tiny", text, "--anchors", str(out), "--anchor-readout", "linear",
                        "--json", *common], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    engine = get_engine(PipelineConfig(**{**config.to_dict(), "anchors": str(out), "anchor_readout": "linear"}))
    readout = LinearReadout.load(out, engine.knn.anchors)
    x = engine.knn.query_logp([text])  # [1, S+1]
    want = readout.predict(x)[0]
    got = json.loads(p.stdout)["probs"]
    # the script's process computes x in other batch shapes and threads: each feature within
    # lm_rtol * |x|, moved through the standardised weights to the logits, then twice into p
    w = np.abs(readout.weight.astype(np.float64) / readout.std[:, None]).sum(0).max()
    tol = 2 * lm_rtol(engine.lm) * w * (1 + np.abs(x).max())
    np.testing.assert_allclose([got[lab] for lab in engine.index.labels], want, rtol=0, atol=tol)
    plain = tmp_path / "plain"  # anchors without a readout: one line naming the fix
    subprocess.run([str(ICL), "anchors", "build", "tiny", "--out", str(plain), "--support", "64", *common],
                   capture_output=True, text=True, timeout=300, check=True)
    p = subprocess.run([str(ICL), "classify", "tiny", text, "--anchors", str(plain), "--anchor-readout", "linear",
                        *common], capture_output=True, text=True, timeout=300)
    # one error line; on a busy machine the engine's load may say first that it is going on
    assert p.returncode == 1 and "Traceback" not in p.stderr and said(p.stderr) == [
        f"error: {plain} holds no linear readout (fit one with `icl anchors build --readout linear`)"]
