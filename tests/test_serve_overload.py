"""`icl serve` the way production breaks it: more clients than it can serve, deadlines passing
while the model works, clients that leave, slow and greedy clients. A real uvicorn server on a
loopback port (in a thread of this process, so the tiny LM can be slowed down to a known pace:
every LM forward takes at least SLOW seconds), real HTTP clients and raw sockets."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import make_tiny_model, make_tiny_tokenizer

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from icl_engine.apps import indexes as index_api  # noqa: E402
from icl_engine.apps.service import ServeConfig, create_app  # noqa: E402
from icl_engine.apps.service.guard import guarded_h11  # noqa: E402

pytestmark = pytest.mark.slow  # real server processes under load

ROWS = [("a wonderful film", "positive"), ("great acting and a moving story", "positive"),
        ("a dull boring film", "negative"), ("terrible plot and bad acting", "negative")]
SLOW = 0.15  # seconds per LM forward: the model's pace in these tests


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    data = root / "good.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS))
    index_api.build_index(str(data), "good", embedder="hashing:64", indexes_dir=root / "indexes")
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok)).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root


@pytest.fixture
def slow_lm(monkeypatch):
    """Every scoring or decoding forward of the LM takes at least SLOW seconds."""
    from icl_engine.core.backends.hf import HFBackend

    for name in ("score_batch", "next_token_logprobs"):
        real = getattr(HFBackend, name)

        def slowed(self, *a, _real=real, **kw):
            time.sleep(SLOW)
            return _real(self, *a, **kw)

        monkeypatch.setattr(HFBackend, name, slowed)


class Server:
    """A real server on a free loopback port, in a thread; `url`, `metric(name)`."""

    def __init__(self, root: Path, **settings):
        self.config = ServeConfig(indexes=("good",), indexes_dir=str(root / "indexes"), lm=str(root / "lm"),
                                  port=_free_port(), **settings)
        app = create_app(self.config)
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.config.port, log_level="warning", lifespan="on",
            http=guarded_h11(self.config.header_timeout_s), timeout_keep_alive=self.config.keep_alive_s))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.config.port}"

    def __enter__(self) -> "Server":
        self.thread.start()
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("the server did not get ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metric(self, name: str, **labels) -> float:
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith(want + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def classify(url: str, text: str = "a great film", timeout: float = 30, **body) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/classify", json={"index": "good", "text": text, "k": 2, **body}, timeout=timeout)
    return r, time.monotonic() - t0


def test_overload_is_refused_at_once_and_what_is_admitted_meets_its_deadline(world, slow_lm):
    """24 closed-loop clients against a model that answers about 1 / SLOW texts a second: every
    answer is a 200 within its deadline or a 503 with Retry-After that came at once; the model
    kept working (goodput); when the clients leave, a lone request is answered about as fast as
    on a quiet server (what the clients abandoned was dropped or cancelled, not finished)."""
    with Server(world, timeout_s=3.0, max_queue_s=1.0, batch_size=1, max_batch_size=4, max_wait_ms=20) as srv:
        quiet = min(classify(srv.url)[1] for _ in range(3))
        stop, results = time.monotonic() + 6.0, []

        def client(i: int) -> None:
            with httpx.Client(timeout=10) as c:
                while time.monotonic() < stop:
                    t0 = time.monotonic()
                    r = c.post(f"{srv.url}/v1/classify", json={"index": "good", "text": f"film number {i}", "k": 2})
                    results.append((r.status_code, time.monotonic() - t0, r.headers.get("retry-after")))
                    if r.status_code == 503:
                        time.sleep(min(float(r.headers["retry-after"]), 0.2))  # a polite client backs off

        with ThreadPoolExecutor(24) as pool:
            list(pool.map(client, range(24)))
        codes = {code for code, _, _ in results}
        assert codes <= {200, 503}, codes  # nothing else: no 504, no 500
        ok = [s for code, s, _ in results if code == 200]
        refused = sorted(s for code, s, _ in results if code == 503)
        assert refused and all(h is not None and int(h) >= 1 for code, _, h in results if code == 503)
        assert max(ok) < 3.0  # admitted work meets its deadline
        assert refused[len(refused) // 2] < 0.25  # refused at once, not after queueing (median; the
        # machine running the suite is busy, so no tail bound here: serve_bench measures the p99)
        assert len(ok) >= 0.5 * 6.0 / SLOW / 2  # goodput: at least half of what LM batches of 1-2 allow
        assert srv.metric("icl_jobs_rejected_total", kind="classify") == len(refused)
        lone = classify(srv.url)[1]
        assert lone < 2 * quiet + 4 * SLOW, (lone, quiet)


def test_a_passed_deadline_stops_the_work_at_the_next_lm_batch(world, slow_lm):
    """A request needing 8 LM batches (8 x SLOW) with a 0.5 s deadline gets its 504; the model
    stops at its next batch boundary, so a search sent right after is answered at once."""
    with Server(world, timeout_s=0.5, batch_size=1) as srv:
        texts = [f"text {i}" for i in range(8)]
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/classify", json={"index": "good", "texts": texts, "k": 2}, timeout=10)
        assert r.status_code == 504 and time.monotonic() - t0 < 0.5 + 2 * SLOW
        t0 = time.monotonic()
        s = httpx.post(f"{srv.url}/v1/search", json={"index": "good", "text": "a film", "k": 2}, timeout=10)
        assert s.status_code == 200 and time.monotonic() - t0 < 0.5, time.monotonic() - t0
        end = time.monotonic() + 5
        while srv.metric("icl_jobs_cancelled_total", kind="classify") < 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.metric("icl_jobs_cancelled_total", kind="classify") == 1


def test_a_client_that_leaves_has_its_queued_work_dropped(world, slow_lm):
    """Work queued for a client that closed its connection never reaches the model."""
    with Server(world, timeout_s=10, batch_size=1, max_batch_size=8) as srv:
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(httpx.post, f"{srv.url}/v1/classify", timeout=10,
                               json={"index": "good", "texts": [f"t {i}" for i in range(6)], "k": 2})
            time.sleep(SLOW)  # the model works on `busy` now
            with pytest.raises(httpx.ReadTimeout):  # this client gives up and closes its connection
                httpx.post(f"{srv.url}/v1/classify", json={"index": "good", "text": "gone", "k": 2}, timeout=0.2)
            assert busy.result().status_code == 200
        end = time.monotonic() + 5
        while srv.metric("icl_jobs_dropped_total", kind="classify") < 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.metric("icl_jobs_dropped_total", kind="classify") == 1


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_slow_and_greedy_clients(world):
    """Headers never finished: the connection is closed after header_timeout_s. A body shorter
    than its Content-Length: 408 after body_timeout_s. A Content-Length over the limit: 413 at
    once, the body never read. A body that grows past the limit while read (chunked): 413."""
    with Server(world, header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=64 * 1024) as srv:
        port = srv.config.port
        s = _raw(port)
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: app")  # headers never end
        t0 = time.monotonic()
        assert _read_all(s) == b"" and time.monotonic() - t0 < 3  # closed by the server
        s.close()

        s = _raw(port)
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"index\": ")  # 10 of 100 bytes, then nothing
        t0 = time.monotonic()
        reply = _read_all(s)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3, reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 408
        s.close()

        s = _raw(port)
        s.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 20000000\r\n\r\n")  # 20 MB announced, none sent
        reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        s.close()

        def chunks():
            yield b'{"index": "good", "text": "'
            for _ in range(100):
                yield b"x" * 1024
            yield b'"}'

        r = httpx.post(f"{srv.url}/v1/search", content=chunks(), headers={"Content-Type": "application/json"},
                       timeout=10)
        assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_field_limits_and_strict_counts(world):
    with Server(world, max_text_chars=1000) as srv:
        u = srv.url
        big = "word " * 400  # 2,000 characters: under the body limit, over the text limit
        for path, body in (("/v1/search", {"index": "good", "text": big}),
                           ("/v1/classify", {"index": "good", "text": big}),
                           ("/v1/completions", {"prompt": big, "max_tokens": 1})):
            r = httpx.post(u + path, json=body, timeout=10)
            assert r.status_code == 413 and "at most 1000" in r.json()["error"]["message"], (path, r.text)
        for k in (True, 2.0, "2"):
            r = httpx.post(f"{u}/v1/classify", json={"index": "good", "text": "a film", "k": k}, timeout=10)
            assert r.status_code == 422 and r.json()["error"]["message"].startswith("k:"), (k, r.text)
        for text in ("   ", "\u200b\u200b", "\ufeff "):
            for path in ("/v1/search", "/v1/classify"):
                r = httpx.post(u + path, json={"index": "good", "text": text}, timeout=10)
                assert r.status_code == 400 and "empty" in r.json()["error"]["message"], (path, text, r.text)
        r = httpx.post(f"{u}/v1/search", json={"index": "good", "query": "a film", "k": 2}, timeout=10)
        assert r.status_code == 200 and r.headers.get("deprecation") == "true"  # the old field name, still read
