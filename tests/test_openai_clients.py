"""Third-party clients against a real `icl serve` process on a loopback port (tiny LM): the
official `openai` client (models, legacy completions with echo and logprobs, errors in OpenAI's
shape) and lm-evaluation-harness's `local-completions` model, whose log-likelihoods must equal
`icl eval --method zero`'s log-scores on the same prompts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_tiny_model, make_tiny_tokenizer
from numerics import assert_scores_close

pytestmark = pytest.mark.slow  # a real server and third-party clients

ICL = Path(sys.executable).with_name("icl")
ROWS = [("the movie was great", "positive"), ("a dull boring film", "negative"), ("great film", "positive"),
        ("terrible plot", "negative"), ("wonderful acting", "positive"), ("a boring movie", "negative")]
TEMPLATE = {"input_format": "Review: {input}\nSentiment:", "output_format": " {output}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, LM folder, work folder): an `icl serve` process over a tiny LM and an index of ROWS."""
    root = tmp_path_factory.mktemp("openai")
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    (root / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS))
    (root / "template.json").write_text(json.dumps(TEMPLATE))
    env = {**os.environ, "ICL_INDEXES": str(root / "indexes")}
    subprocess.run([str(ICL), "index", "build", str(root / "test.jsonl"), "--name", "rt", "--embedder", "hashing:64",
                    "--template", str(root / "template.json")], env=env, check=True, capture_output=True)
    port = _free_port()
    proc = subprocess.Popen([str(ICL), "serve", "--index", "rt", "--lm", str(root / "lm"), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "not ready in 120 s"
            time.sleep(0.2)
        yield url, root / "lm", root, env
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_openai_client(served):
    openai = pytest.importorskip("openai")
    url, lm, _, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    [model] = client.models.list().data
    assert model.id == str(lm) and model.owned_by == "icl_engine"
    done = client.completions.create(model=model.id, prompt="Review: great film\nSentiment:", max_tokens=2, echo=True,
                                     logprobs=1, temperature=0)
    [choice] = done.choices
    assert choice.text.startswith("Review: great film\nSentiment:") and choice.finish_reason in ("length", "stop")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    with pytest.raises(openai.NotFoundError) as e:  # OpenAI's error object: the client reads its message
        client.completions.create(model="gpt-5", prompt="x", max_tokens=1)
    assert "does not exist" in str(e.value) and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model.id, prompt="x", max_tokens=1, stream=True)
    assert "stream is not supported" in str(e.value)


def test_lm_evaluation_harness_local_completions(served, tmp_path, icl_forks):
    """lm-eval's `local-completions` model, a multiple-choice task on local data: its per-choice
    log-likelihoods are `icl eval --method zero`'s log-scores (the same prompts, scored by the
    same LM through /v1/completions with echo), and so are its answers."""
    pytest.importorskip("lm_eval")
    url, lm, root, env = served
    task = tmp_path / "task.yaml"
    task.write_text("\n".join([
        "task: icl_sentiment", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {root / 'test.jsonl'}", "test_split: test", "output_type: multiple_choice",
        'doc_to_text: "Review: {{text}}\\nSentiment:"', 'doc_to_choice: ["negative", "positive"]',
        "doc_to_target: \"{{['negative', 'positive'].index(label)}}\"", 'target_delimiter: " "',
        "metric_list:", "  - metric: acc"]) + "\n")
    args = (f"model={lm},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={lm},"
            "num_concurrent=1,max_retries=1")
    p = subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "--model", "local-completions", "--model_args",
                        args, "--tasks", "icl_sentiment", "--include_path", str(tmp_path), "--output_path",
                        str(tmp_path / "out"), "--log_samples"], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    [samples] = list((tmp_path / "out").rglob("samples_icl_sentiment_*.jsonl"))
    theirs = {json.loads(line)["doc"]["text"]: [float(r[0]) for r in json.loads(line)["filtered_resps"]]
              for line in samples.read_text().splitlines()}
    ours = icl_forks.run(["eval", "rt", "--test", str(root / "test.jsonl"), "--method", "zero", "--lm", str(lm),
                          "--json", "--predictions"], cwd=tmp_path, env=env)  # `icl eval`, forked (tests/icl_forks.py)
    assert ours.returncode == 0, ours.stderr
    preds = json.loads(ours.stdout)["predictions"]
    assert len(preds) == len(theirs) == len(ROWS)
    for p in preds:
        assert_scores_close(theirs[p["text"]], p["log_scores"], lm)
        assert ["negative", "positive"][max(range(2), key=lambda i: theirs[p["text"]][i])] == p["label"]
