"""`icl serve`: every endpoint and error class in process (FastAPI's TestClient), answers equal
to the offline engine's whatever batch a request shared, and one real `icl serve` process
started, queried and stopped with SIGTERM. Tiny random LM, hashing embedder: no downloads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import make_tiny_model, make_tiny_tokenizer
from numerics import assert_probs_close, assert_scores_close

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from icl_engine.apps import indexes as index_api  # noqa: E402
from icl_engine.apps.service import ServeConfig, create_app  # noqa: E402

ICL = Path(sys.executable).with_name("icl")
ROWS = [("a wonderful film", "positive"), ("great acting and a moving story", "positive"),
        ("a dull boring film", "negative"), ("terrible plot and bad acting", "negative"),
        ("the movie was great", "positive"), ("a boring movie with a dull plot", "negative")]
QUERIES = ["a great film", "boring", "the acting was wonderful and the plot was great and moving",
           "terrible", "a dull film with bad acting", "great great great", "the movie", "a moving story"]
# Queries whose similarities to the 6 records are all distinct. With ties (common with a 64-dim
# hashing embedder on 6 records), which tied record is selected depends on the search path:
# index.search scans fewer than 4 queries with numpy and more with faiss, and they break ties
# differently, so a tie can change the demonstrations between batched and lone queries (offline
# `icl eval` vs `icl classify` alike). Batching must not change the LM's scores: that is tested here.
DISTINCT = ["a great film", "a dull film with bad acting", "a wonderful moving film", "bad acting and a dull plot",
            "a great story with wonderful acting", "a dull and boring plot"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Indexes (classification, generation), a tiny LM folder, a soft prompt for another LM."""
    root = tmp_path_factory.mktemp("serve")
    data = root / "good.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS))
    gen = root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"input": t, "output": lab}) + "\n" for t, lab in ROWS))
    indexes = root / "indexes"
    index_api.build_index(str(data), "good", embedder="hashing:64", indexes_dir=indexes)
    index_api.build_index(str(gen), "gen", embedder="hashing:64", indexes_dir=indexes)
    tok = make_tiny_tokenizer()
    lm = root / "tiny-lm"
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(lm)
    tok.save_pretrained(lm)
    adapters = root / "adapters"
    _soft_prompt(adapters / "wide", width=48)  # the tiny LM's hidden size is 32
    return root, indexes, lm, adapters


def _soft_prompt(folder: Path, width: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                                            "token_dim": width}))
    save_file({"prompt_embeddings": torch.zeros(2, width)}, str(folder / "adapter_model.safetensors"))


def _config(world, **kw) -> ServeConfig:
    root, indexes, lm, adapters = world
    return ServeConfig(**{"indexes": ("good",), "indexes_dir": str(indexes), "lm": str(lm),
                          "adapters_dir": str(adapters), **kw})


def _wait_ready(client, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/readyz').json()}")


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(_config(world, max_wait_ms=100))) as c:
        _wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def offline(world, client):
    """The offline engine over the same LM object, index and settings the service uses."""
    from icl_engine.core.pipeline import Engine, PipelineConfig

    service = client.app.state.service
    _, indexes, lm, _ = world
    return lambda index="good", **kw: Engine.load(PipelineConfig(index=index, indexes_dir=str(indexes), lm=str(lm),
                                                                 **kw), lm=service.lm)


def _one_sentence(r) -> str:
    """The error's message, after checking the body is OpenAI's error object."""
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    msg = body["error"]["message"]
    code = body["error"]["code"]  # the HTTP status, or a more precise name (model_not_found)
    assert isinstance(msg, str) and msg and "\n" not in msg and (code == r.status_code or isinstance(code, str)), body
    return msg


# ----------------------------------------------------------------------------- health, docs, metrics


def test_health_ready_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["indexes"] == ["good"]
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/classify", "/v1/completions"}
    assert client.get("/docs").status_code == 200


def test_readyz_is_503_until_loaded(world):
    app = create_app(_config(world))
    service = app.state.service
    gate = threading.Event()
    with TestClient(app) as c:
        app.state.scheduler.worker.submit(gate.wait)  # the model thread is busy: the LM cannot load yet
        try:
            # the load was queued at start-up; until it runs the service is alive but not ready
            if not service.ready:
                r = c.get("/readyz")
                assert r.status_code == 503 and r.json()["ready"] is False
            assert c.get("/healthz").status_code == 200
        finally:
            gate.set()
        _wait_ready(c)


def test_on_ready_runs_once_loaded_before_ready(world):
    """`on_ready` (what `icl serve` freezes the loaded heap with) runs after the LM and the
    indexes named at start have loaded, and before /readyz says ready; never on a failed load."""
    calls = []
    app = create_app(_config(world), on_ready=lambda: calls.append((app.state.service.ready,
                                                                      sorted(app.state.service.indexes))))
    with TestClient(app) as c:
        _wait_ready(c)
    assert calls == [(False, ["good"])]
    failed = []
    with TestClient(create_app(_config(world, lm=str(world[0] / "no-such-lm")), on_ready=lambda: failed.append(1))) as c:
        end = time.monotonic() + 30
        while "error" not in c.get("/readyz").json():
            assert time.monotonic() < end
            time.sleep(0.05)
    assert failed == []


def test_compile_is_paid_before_ready(world, monkeypatch):
    """`icl serve --compile`: the LM is compiled (HFBackend.compile: tested for its scores in
    test_lm) and each classification index loaded at start runs a batch of 1 and one of 2 before
    /readyz says ready, so no request pays the compile. Here compile only records its call."""
    from icl_engine.core.backends.hf import HFBackend
    from icl_engine.core.pipeline import Engine

    events = []
    monkeypatch.setattr(HFBackend, "compile", lambda self: events.append("compile") or setattr(self, "compiled", True))
    real = Engine.classify
    monkeypatch.setattr(Engine, "classify", lambda self, texts, **kw: events.append(
        (len(texts), app.state.service.ready)) or real(self, texts, **kw))
    app = create_app(_config(world, compile=True), on_ready=lambda: events.append("on_ready"))
    with TestClient(app) as c:
        _wait_ready(c)
        assert app.state.service.lm.compiled
    assert events == ["compile", (1, False), (2, False), "on_ready"]


def test_serve_freezes_the_loaded_heap(world, monkeypatch):
    """`serve` (the process's owner) hands create_app the heap freezer; it collects, then
    leaves the objects alive then out of every later collection."""
    import gc

    import uvicorn

    from icl_engine.apps.service import server
    from icl_engine.core.engines import freeze_loaded_heap

    seen = {}
    real = server.create_app
    monkeypatch.setattr(server, "create_app", lambda config, **kw: seen.update(kw) or real(config, **kw))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    server.serve(_config(world))
    assert seen["on_ready"] is freeze_loaded_heap
    before = gc.get_freeze_count()
    try:
        freeze_loaded_heap()
        assert gc.get_freeze_count() > before and gc.get_count()[2] == 0
    finally:
        gc.unfreeze()  # this test process goes on making (and collecting) garbage


def test_failed_load_says_why(world):
    with TestClient(create_app(_config(world, lm=str(world[0] / "no-such-lm")))) as c:
        end = time.monotonic() + 30
        while "error" not in c.get("/readyz").json() and time.monotonic() < end:
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and "no-such-lm" in r.json()["error"]
        r = c.post("/v1/classify", json={"index": "good", "text": "a film"})
        assert r.status_code == 503 and _one_sentence(r)


def test_metrics_prometheus_text(client):
    client.post("/v1/classify", json={"index": "good", "text": "a film"})
    client.post("/v1/classify", json={"index": "nope", "text": "a film"})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ("# TYPE icl_requests_total counter", "# TYPE icl_request_duration_seconds histogram",
                 "# TYPE icl_batch_texts histogram", "# TYPE icl_queue_texts gauge", "icl_ready 1.0"):
        assert line in text, line
    assert 'icl_requests_total{endpoint="/v1/classify",status="200"}' in text
    assert 'icl_request_errors_total{endpoint="/v1/classify",status="404"}' in text
    assert 'icl_request_duration_seconds_bucket{endpoint="/v1/classify",le="+Inf"}' in text
    assert "icl_batch_texts_count" in text and "icl_batch_texts_sum" in text
    # the model thread's busy seconds: what a classify ran, and no more than the time it took
    busy = float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith('icl_model_busy_seconds_total{kind="classify"}')))
    t0 = time.perf_counter()
    client.post("/v1/classify", json={"index": "good", "text": "another film"})
    took = time.perf_counter() - t0
    text = client.get("/metrics").text
    now = float(next(line.split()[-1] for line in text.splitlines()
                     if line.startswith('icl_model_busy_seconds_total{kind="classify"}')))
    assert 0 < now - busy <= took


# ----------------------------------------------------------------------------- classify, batching


def test_classify_is_icl_classify_json(client, offline):
    got = client.post("/v1/classify", json={"index": "good", "text": "a great film", "k": 3})
    assert got.status_code == 200, got.text
    [want] = offline(k=3).classify(["a great film"])
    want = json.loads(json.dumps(asdict(want)))
    assert got.json().keys() == want.keys()
    assert_scores_close(got.json()["log_scores"], want["log_scores"], client.app.state.service.lm)
    assert got.json()["label"] == want["label"] and got.json()["demos"] == want["demos"]
    assert got.json()["prompt_tokens"] == want["prompt_tokens"]
    many = client.post("/v1/classify", json={"index": "good", "texts": QUERIES[:3], "k": 3}).json()["predictions"]
    assert [p["label"] for p in many] == [p.label for p in offline(k=3).classify(QUERIES[:3])]


@pytest.mark.parametrize("calibration", ["none", "contextual"])
def test_concurrent_requests_share_batches_and_answer_as_offline(client, offline, calibration):
    """Requests of different lengths sent together are merged into engine calls (padding); each
    answer's log-scores equal the offline engine's for that text alone (within float32 rounding)."""
    metrics = client.app.state.metrics
    before = metrics.batch_requests.collect()[0].samples
    body = lambda q: {"index": "good", "text": q, "k": 4, "calibration": calibration}  # noqa: E731
    with ThreadPoolExecutor(len(DISTINCT) * 2) as pool:
        answers = list(pool.map(lambda q: client.post("/v1/classify", json=body(q)), DISTINCT * 2))
    engine = offline(k=4, calibration=calibration)
    for q, r in zip(DISTINCT * 2, answers):
        assert r.status_code == 200, r.text
        [alone] = engine.classify([q])
        assert_scores_close(r.json()["log_scores"], alone.log_scores, engine.lm)
        assert_probs_close(list(r.json()["probs"].values()), list(alone.probs.values()), alone.log_scores, engine.lm)
        assert [d["id"] for d in r.json()["demos"]] == [d.id for d in alone.demos]
    after = metrics.batch_requests.collect()[0].samples
    count = lambda samples: next(s.value for s in samples if s.name.endswith("_count"))  # noqa: E731
    total = lambda samples: next(s.value for s in samples if s.name.endswith("_sum"))  # noqa: E731
    calls, requests = count(after) - count(before), total(after) - total(before)
    assert requests == len(DISTINCT) * 2 and calls < requests, "no two requests shared an engine call"


def _counting(monkeypatch, owner, name: str) -> list:
    """Replace owner.name by a wrapper that records each call's arguments; returns the record."""
    calls, real = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_requests_with_different_k_share_one_lm_pass(world, tmp_path, monkeypatch):
    """k = 4 and k = 8 on one index, sent together, are scored by ONE Engine.launch and ONE
    launch_scores (one LM pass). No timing is relied on: with max_batch_size 2 and a long
    max_wait the first request's batch closes exactly when the second one is queued."""
    from icl_engine.core import pipeline

    _, _, lm, _ = world
    rows = ROWS + [(f"{t} indeed", lab) for t, lab in ROWS]  # 12 records: k = 8 gets all 8
    data = tmp_path / "twelve.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    index_api.build_index(str(data), "twelve", embedder="hashing:64", indexes_dir=tmp_path / "indexes")
    config = ServeConfig(indexes=("twelve",), indexes_dir=str(tmp_path / "indexes"), lm=str(lm),
                         max_batch_size=2, max_wait_ms=60_000, timeout_s=120)
    with TestClient(create_app(config)) as c:
        _wait_ready(c)
        launches = _counting(monkeypatch, pipeline.Engine, "launch")
        passes = _counting(monkeypatch, pipeline, "launch_scores")
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda k: c.post("/v1/classify", json={"index": "twelve", "text": "a great film",
                                                                           "k": k}), (4, 8)))
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert [len(r.json()["demos"]) for r in answers] == [4, 8]
    assert len(launches) == 1 and len(passes) == 1
    assert len(passes[0][1]) == 2  # that one pass scored both prompts


def test_a_classify_request_reads_the_index_pointer_once(client, world, monkeypatch):
    """The service asks the index store for the current version once per request (Service.spec)
    and hands that version on, instead of every layer reading the pointer again."""
    from icl_engine.core.index import store

    _, indexes, _, _ = world
    client.post("/v1/classify", json={"index": "good", "text": "a film"})  # anything lazy happens now
    reads = _counting(monkeypatch, store, "read_pointer")
    r = client.post("/v1/classify", json={"index": "good", "text": "a great film", "k": 3})
    assert r.status_code == 200, r.text
    assert [Path(args[0]) for args in reads] == [indexes / "good"]


def test_a_bad_request_in_a_batch_fails_alone(client, world):
    """A query too long for the budget fails its own request only, not the batch it joined."""
    long = " ".join(["wonderful"] * 600)
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda q: client.post("/v1/classify", json={"index": "good", "text": q}),
                           ["a great film", long, "boring", "a dull film"]))
    assert [r.status_code for r in rs] == [200, 400, 200, 200], [r.text for r in rs]
    _one_sentence(rs[1])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, status", [
    ({"index": "nope", "text": "a film"}, 404),  # unknown index
    ({"index": "../indexes/good", "text": "a film"}, 400),  # a path: never outside the indexes dir
    ({"index": "/etc", "text": "a film"}, 400),
    ({"index": "good", "text": "   "}, 400),  # empty text
    ({"index": "good", "texts": []}, 400),
    ({"index": "good", "text": "x" * 20_001}, 413),  # oversized text
    ({"index": "good", "texts": ["a film"] * 65}, 413),  # too many texts
    ({"index": "good", "text": "a film", "k": -1}, 422),  # bad k
    ({"index": "good", "text": "a film", "k": "many"}, 422),
    ({"index": "good", "text": "a film", "method": "magic"}, 422),
    ({"index": "good", "text": "a film", "texts": ["b"]}, 422),
    ({"index": "good"}, 422),
    ({"text": "a film"}, 422),
    ({"index": "good", "text": "a film", "colour": "red"}, 422),
    ({"index": "good", "text": "a film", "labels": ["positive", "neutral"]}, 400),  # unknown label set
    ({"index": "good", "text": "a film", "soft_prompt": "wide"}, 400),  # a soft prompt for another LM
    ({"index": "good", "text": "a film", "soft_prompt": "missing"}, 404),
    ({"index": "good", "text": "a film", "soft_prompt": "../x"}, 400),
    ({"index": "gen", "text": "a film"}, 400),  # a generation index cannot classify
])
def test_classify_errors_are_one_sentence(client, body, status):
    r = client.post("/v1/classify", json=body)
    assert r.status_code == status, r.text
    _one_sentence(r)


def test_malformed_json_and_unknown_routes(client):
    r = client.post("/v1/classify", content=b'{"index": "good", "text": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in _one_sentence(r)
    r = client.post("/v1/classify")
    assert r.status_code == 400 and _one_sentence(r)
    assert client.get("/v1/nothing").status_code == 404 and _one_sentence(client.get("/v1/nothing"))
    assert client.get("/v1/classify").status_code == 405
    r = client.post("/v1/search", json={"index": "good", "query": "a film", "k": 0})
    assert r.status_code == 422 and _one_sentence(r)


def test_labels_that_match_are_accepted(client):
    r = client.post("/v1/classify", json={"index": "good", "text": "a film", "labels": ["negative", "positive"]})
    assert r.status_code == 200, r.text


def test_failure_and_timeout_never_take_the_server_down(world, monkeypatch):
    from icl_engine.core.pipeline import Engine

    with TestClient(create_app(_config(world, timeout_s=0.5))) as c:
        _wait_ready(c)
        monkeypatch.setattr(Engine, "classify", lambda self, *a, **kw: 1 / 0)
        r = c.post("/v1/classify", json={"index": "good", "text": "a film"})
        assert r.status_code == 500 and _one_sentence(r).startswith("ZeroDivisionError")
        monkeypatch.undo()
        gate = threading.Event()
        c.app.state.scheduler.worker.submit(gate.wait, 5)  # the model is busy past the timeout
        r = c.post("/v1/classify", json={"index": "good", "text": "a film"})
        gate.set()
        assert r.status_code == 504 and _one_sentence(r)
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/classify", json={"index": "good", "text": "a film"}).status_code == 200


def test_api_key(world, monkeypatch):
    with TestClient(create_app(_config(world, api_key="s3cret"))) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code in (200, 503)
        for path in ("/v1/indexes", "/metrics", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and _one_sentence(r)
        assert c.get("/v1/indexes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/indexes", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# ----------------------------------------------------------------------------- generate, search, indexes


def test_generate_and_its_stream(client, offline):
    body = {"index": "gen", "input": "a great film", "k": 2, "max_new_tokens": 12}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    [want] = offline("gen", k=2, max_new_tokens=12).generate(["a great film"])
    assert r.json() == json.loads(json.dumps(asdict(want)))
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [e for e in s.read().decode().split("\n\n") if e]
    pieces = [json.loads(e.removeprefix("data: "))["output"] for e in events[:-1]]
    assert events[-1].startswith("event: done\ndata: ")
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert done == r.json() and "".join(pieces).strip() == done["output"]
    r = client.post("/v1/generate", json={"index": "nope", "input": "x", "stream": True})
    assert r.status_code == 404 and _one_sentence(r)


def test_generate_stream_equals_generate(tiny_tokenizer):
    from icl_engine.core.generate import generate, generate_stream, stream_safe

    from conftest import make_tiny_lm

    lm = make_tiny_lm(tiny_tokenizer)
    for prompt, stop in [("the movie was", ("\n\n",)), ("a dull", ("e",)), ("great", ())]:
        pieces, tokens = [], []
        text = generate_stream(lm, prompt, on_text=pieces.append, on_token=tokens.append, max_new_tokens=20, stop=stop)
        assert text == generate(lm, [prompt], max_new_tokens=20, stop=stop)[0]
        assert "".join(pieces) == text and 1 <= len(tokens) <= 20
    assert stream_safe("ab\n", ("\n\n",)) == "ab" and stream_safe("ab\n\ncd", ("\n\n",)) == "ab"


def test_search_and_indexes(client, world):
    r = client.post("/v1/search", json={"index": "good", "query": "a great film", "k": 3})
    assert r.status_code == 200
    assert r.json()["hits"] == index_api.search("good", "a great film", k=3, indexes_dir=world[1])
    rows = client.get("/v1/indexes").json()["indexes"]
    assert {r["name"]: r["loaded"] for r in rows}["good"] is True and {r["name"] for r in rows} == {"good", "gen"}
    info = client.get("/v1/indexes/good").json()
    assert info["count"] == len(ROWS) and info["loaded"] is True
    assert client.get("/v1/indexes/nope").status_code == 404
    assert client.get("/v1/indexes/..%2Fx").status_code in (400, 404)
    assert client.get("/v1/indexes/.hidden").status_code == 400


# ----------------------------------------------------------------------------- OpenAI completions


def test_completions_echo_logprobs_score_like_the_reference(client):
    """lm-evaluation-harness's log-likelihood request: echo, max_tokens 1, logprobs 1; its
    token_logprobs[ctxlen:-1] sum to the brute-force score of the continuation."""
    from icl_engine.core.score import score_brute_force

    lm = client.app.state.service.lm
    ctx, cont = lm.tokenizer("the movie was").input_ids, lm.tokenizer(" great").input_ids
    r = client.post("/v1/completions", json={"prompt": [ctx + cont], "max_tokens": 1, "echo": True,
                                              "logprobs": 1, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ctx) + len(cont) + 1 and lp["token_logprobs"][0] is None
    want = score_brute_force(lm, [ctx], [cont])[0, 0]
    assert abs(sum(lp["token_logprobs"][len(ctx):-1]) - want) < 1e-4
    greedy = [t == max(top.values()) for t, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:])]
    assert greedy[-1]  # the generated token is the greedy one at temperature 0
    text = choice["text"]
    for tok, off in zip(lp["tokens"], lp["text_offset"]):
        assert text[off:off + len(tok)] == tok
    assert r.json()["object"] == "text_completion" and r.json()["usage"]["prompt_tokens"] == len(ctx) + len(cont)


def test_completions_text_prompts_and_max_tokens(client):
    r = client.post("/v1/completions", json={"prompt": ["a dull", "great acting"], "max_tokens": 0, "echo": True,
                                              "logprobs": 0})
    a, b = r.json()["choices"]
    assert (a["index"], b["index"]) == (0, 1) and a["text"] == "a dull" and b["text"] == "great acting"
    assert len(a["logprobs"]["tokens"]) == len(client.app.state.service.lm.tokenizer("a dull").input_ids)
    r = client.post("/v1/completions", json={"prompt": "the movie", "max_tokens": 5, "temperature": 0})
    [c] = r.json()["choices"]
    assert c["logprobs"] is None and not c["text"].startswith("the movie") and c["finish_reason"] in ("length", "stop")
    for bad, status in [({"prompt": ""}, 400), ({"prompt": [10**9]}, 400), ({"prompt": "x", "max_tokens": -1}, 422),
                        ({"prompt": "x", "stream": True}, 400), ({"prompt": "x", "n": 2}, 422), ({}, 422)]:
        r = client.post("/v1/completions", json=bad)
        assert r.status_code == status, (bad, r.text)
        _one_sentence(r)


# ----------------------------------------------------------------------------- the real process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_icl_serve_process_starts_answers_and_stops_on_sigterm(world, tmp_path):
    import httpx

    _, indexes, lm, _ = world
    port = _free_port()
    env = {**os.environ, "ICL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(ICL), "serve", "--index", "good", "--indexes-dir", str(indexes), "--lm", str(lm),
                             "--port", str(port), "--max-wait-ms", "3000"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        r = httpx.post(f"{url}/v1/classify", json={"index": "good", "text": "a great film"}, timeout=30)
        assert r.status_code == 200 and r.json()["label"] in ("positive", "negative")
        # a request in flight when SIGTERM arrives is answered before the process exits
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(httpx.post, f"{url}/v1/classify", json={"index": "good", "text": "boring"},
                                   timeout=30)
            # SIGTERM only once it waits in the batcher (up to 3 s): a loaded machine may take a while
            # to deliver the request at all
            end = time.monotonic() + 30
            while "icl_queue_texts 1.0" not in httpx.get(f"{url}/metrics", timeout=5).text:
                assert time.monotonic() < end and not inflight.done(), "the request never queued"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert inflight.result().status_code == 200
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "Traceback" not in log and f"127.0.0.1:{port}" in log
