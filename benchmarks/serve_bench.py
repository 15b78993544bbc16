"""`icl serve` under load: 1, 8 and 32 concurrent clients sending Rotten Tomatoes test reviews
(k = 8, the default SmolLM2 and MiniLM) to a real `icl serve` process over loopback, next to the
offline throughput of what `icl eval` runs (queries.evaluate_file) with the same settings, measured in
the same run before and after the clients (so drifting load on a shared machine hits both).

    .venv/bin/python benchmarks/serve_bench.py                  # a few minutes on 2 cores
    .venv/bin/python benchmarks/serve_bench.py --levels 1:4 8:16 32:32 --offline 32   # quicker

    .venv/bin/python benchmarks/serve_bench.py --levels --overload 64:60 --server-timeout 30   # overload only

`--overload CLIENTS:SECONDS`: more clients than the server can answer (about 1 q/s with one thread
at k = 8), closed-loop for SECONDS, each request with the server's deadline (`--server-timeout`);
a rejected client waits what Retry-After says (at most the time left) before its next request.
Goodput = answers within their deadline per second, from the first request to the last answer,
against the offline throughput of the same reviews: after the load, `icl eval` runs on exactly
the reviews the server answered in time (the first n reviews cost more or less than the ones the
clients happened to send; both figures are reported). The server's busy seconds
(icl_model_busy_seconds) split what goodput loses into model idle time and per-review cost. A
lone request is then sent once every client has its last answer, against the quiet lone latency.
Written to serve_bench_overload.json and .md.

Each level is closed-loop: `clients` threads, each sending its next request when its last is
answered, until `requests` have been sent; queries/s = requests / wall seconds of the level.
Latency is per request (client side). Both processes run with ICL_NUM_THREADS torch threads
(default 1). Bounded: every request has a client timeout, and the script stops the server
with SIGTERM (its exit code is recorded). Writes benchmarks/results/serve/serve_bench.json
and .md. The index `rotten_tomatoes` (built-in train split) is built under ./indexes if absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ICL = Path(sys.executable).with_name("icl")
OUT = ROOT / "benchmarks" / "results" / "serve"
INDEX = "rotten_tomatoes"


def load_avg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]  # nearest rank


# The offline side, in its own process like the server: what `icl eval` runs (queries.evaluate_file ->
# evaluate), on an engine warmed by the same two requests the server gets before its levels (the
# first call tokenizes every demonstration once; `icl eval`'s own seconds would include that).
OFFLINE = """
import json, sys
from icl_engine.apps import queries
from icl_engine.core.engines import get_engine
cfg = queries.make_config(sys.argv[1], k=int(sys.argv[2]), batch_size=int(sys.argv[3]))
engine = get_engine(cfg)
engine.classify(sys.argv[6:8])
r = queries.evaluate_file(engine, sys.argv[4], limit=int(sys.argv[5]))
print(json.dumps({"n": r["n"], "seconds": r["seconds"], "accuracy": r["accuracy"]}))
"""


def offline(args, env, warm: list[str], source: str = "rotten_tomatoes:test", n: int | None = None) -> dict:
    """Offline evaluation of the first n reviews of `source` (default: --offline test reviews),
    models loaded and warmed beforehand."""
    p = subprocess.run([sys.executable, "-c", OFFLINE, INDEX, str(args.k), str(args.batch_size), source,
                        str(n or args.offline), *warm], env=env, capture_output=True, text=True, timeout=args.timeout,
                       cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"offline evaluation failed: {p.stderr.strip()[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {**r, "qps": r["n"] / r["seconds"]}


def run_clients(client, clients: int, ready: threading.Barrier | None = None) -> float:
    """`clients` threads running `client` to the end; the wall seconds they took. With `ready`
    (a barrier of clients + 1 that each client waits on once set up), the clock starts when
    every client is ready."""
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if ready is not None:
        ready.wait()
        t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def level(url: str, texts: list[str], clients: int, requests: int, k: int, timeout: float) -> dict:
    """Closed loop: `clients` threads share `requests` requests."""
    lock, lat, status, labels = threading.Lock(), [], [], []
    todo = iter(range(requests))

    def client():
        with httpx.Client(timeout=timeout) as c:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{url}/v1/classify", json={"index": INDEX, "text": texts[i % len(texts)], "k": k})
                    code = r.status_code
                    label = r.json().get("label") if code == 200 else None
                except httpx.HTTPError:
                    code, label = "transport", None
                with lock:
                    lat.append(time.perf_counter() - t0)
                    status.append(code)
                    labels.append((i, label))

    wall = run_clients(client, clients)
    return {"clients": clients, "requests": requests, "seconds": wall, "qps": requests / wall,
            "p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
            "ok": sum(s == 200 for s in status), "errors_4xx": sum(isinstance(s, int) and 400 <= s < 500 for s in status),
            "errors_5xx": sum(isinstance(s, int) and s >= 500 for s in status),
            "transport_errors": sum(s == "transport" for s in status)}


def overload(url: str, texts: list[str], clients: int, seconds: float, k: int, deadline: float,
             start: int = 0) -> dict:
    """`clients` closed-loop clients for `seconds`; per request: status and client-side latency.
    The requests send texts[start], texts[start + 1], ... (cycling)."""
    lock, results, answered = threading.Lock(), [], []  # (status, latency s, sent s into the run); texts answered
    counter = iter(range(start, 10**9))
    # every client's connection pool is made before the clock starts: making one (its TLS context
    # reads the CA bundle) takes milliseconds of this process's GIL, which 63 other threads making
    # theirs would add to the latency of the first requests
    pools = [httpx.Client(timeout=deadline + 5) for _ in range(clients)]
    clock: dict[str, float] = {}  # the run's start, set as the last party reaches the barrier
    ready = threading.Barrier(clients + 1, action=lambda: clock.update(begin=time.perf_counter()))

    def client():
        c = pools.pop()
        ready.wait()
        begin = clock["begin"]
        end = begin + seconds
        with c:
            while time.perf_counter() < end:
                with lock:
                    i = next(counter)
                t0 = time.perf_counter()
                retry = 0.0
                try:
                    r = c.post(f"{url}/v1/classify", json={"index": INDEX, "text": texts[i % len(texts)], "k": k})
                    code = r.status_code
                    retry = float(r.headers.get("retry-after", 0) or 0) if code in (429, 503) else 0.0
                except httpx.HTTPError:
                    code = "transport"
                with lock:
                    results.append((code, time.perf_counter() - t0, t0 - begin))
                    if code == 200 and results[-1][1] <= deadline:
                        answered.append(i % len(texts))
                if retry:
                    time.sleep(max(0.0, min(retry, end - time.perf_counter())))

    wall = run_clients(client, clients, ready)  # every client starts at once
    ok = [lat for code, lat, _ in results if code == 200]
    rejected = [lat for code, lat, _ in results if code in (429, 503)]
    # when the slow refusals were sent, to tell a burst (every client at once) from a steady tail
    slow = sorted((round(sent, 3), round(lat, 3)) for code, lat, sent in results if code in (429, 503) and lat > 0.1)
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": len(results),
            "ok": len(ok), "ok_within_deadline": sum(lat <= deadline for lat in ok),
            "goodput_qps": sum(lat <= deadline for lat in ok) / wall,  # wall: until the last answer
            "rejected": len(rejected), "rejection_p50_s": percentile(rejected, 50) if rejected else None,
            "rejection_p99_s": percentile(rejected, 99) if rejected else None,
            "ok_p50_s": percentile(ok, 50) if ok else None, "ok_p99_s": percentile(ok, 99) if ok else None,
            "rejections_over_100ms": slow,
            "status_counts": {str(c): sum(1 for x, *_ in results if x == c) for c in sorted({x for x, *_ in results}, key=str)},
            "errors_5xx_not_503": sum(isinstance(c, int) and c >= 500 and c != 503 for c, *_ in results),
            "transport_errors": sum(c == "transport" for c, *_ in results), "answered_texts": answered}


def lone(url: str, texts: list[str], k: int, n: int, timeout: float) -> list[float]:
    """`n` requests one after another (the quiet latency)."""
    out = []
    with httpx.Client(timeout=timeout) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post(f"{url}/v1/classify", json={"index": INDEX, "text": texts[i % len(texts)], "k": k})
            r.raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def batch_sizes(url: str) -> dict:
    """The server's own histogram of texts per engine call (sum / count)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    get = lambda name: float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ")))  # noqa: E731,E741
    return {"calls": get("icl_batch_texts_count"), "texts": get("icl_batch_texts_sum")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", nargs="*", default=["1:8", "8:32", "32:64"], help="CLIENTS:REQUESTS per level "
                    "(none: only the overload scenario)")
    ap.add_argument("--overload", default=None, help="CLIENTS:SECONDS: the overload scenario (e.g. 64:60)")
    ap.add_argument("--overload-runs", type=int, default=3, help="runs of the overload scenario (one server)")
    ap.add_argument("--server-timeout", type=float, default=None, help="the server's --timeout (a request's "
                    "deadline; default: --timeout)")
    ap.add_argument("--offline", type=int, default=64, help="test reviews per offline `icl eval` run")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="LM rows per forward (server and eval alike)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--timeout", type=float, default=600, help="client timeout per request / per eval, seconds")
    args = ap.parse_args()
    levels = [tuple(int(x) for x in lv.split(":")) for lv in args.levels]
    env = {**os.environ, "ICL_NUM_THREADS": str(args.threads), "ICL_INDEXES": str(ROOT / "indexes")}
    if not (ROOT / "indexes" / INDEX).exists():
        subprocess.run([str(ICL), "index", "build", "rotten_tomatoes:train", "--name", INDEX], env=env, check=True,
                       cwd=ROOT)
    from icl_engine.core.data import load_dataset

    texts = [r.input for r in load_dataset("rotten_tomatoes:test").records]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = load_avg()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(ICL), "serve", "--index", INDEX, "--port", str(port), "--batch-size",
                               str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms), "--timeout",
                               str(args.server_timeout or args.timeout)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"icl serve exited: {server.stdout.read()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - t0 > 300:
                raise SystemExit("icl serve not ready in 300 s")
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        print(f"server ready in {ready_s:.1f} s; offline eval 1 ...", flush=True)
        off = [offline(args, env, texts[:2])]
        level(url, texts, 1, 2, args.k, args.timeout)  # warm-up: the same two reviews
        rows = []
        for clients, requests in levels:
            before = batch_sizes(url)
            row = level(url, texts, clients, requests, args.k, args.timeout)
            after = batch_sizes(url)
            calls = after["calls"] - before["calls"]
            row["mean_batch_texts"] = (after["texts"] - before["texts"]) / calls if calls else None
            rows.append(row)
            print(json.dumps(row), flush=True)
        runs = []
        for run in range(args.overload_runs if args.overload else 0):
            clients, seconds = (float(x) for x in args.overload.split(":"))
            deadline = args.server_timeout or args.timeout
            quiet = lone(url, texts, args.k, 5, deadline)
            before = metrics(url)
            print(f"overload {run + 1}: {int(clients)} clients for {seconds:g} s ...", flush=True)
            # each run starts where the last one's clients stopped, so the runs send different reviews
            over = overload(url, texts, int(clients), seconds, args.k, deadline, start=sum(r["requests"] for r in runs))
            during = {k: v - before.get(k, 0) for k, v in metrics(url).items()}  # before the lone request
            after_load = lone(url, texts[100:], args.k, 1, deadline)[0]
            over |= {"deadline_s": deadline, "quiet_lone_s": quiet, "quiet_lone_p50_s": statistics.median(quiet),
                     "lone_after_load_s": after_load, "server_metrics": during}
            print(json.dumps(over), flush=True)
            print(f"offline eval of the {len(over['answered_texts'])} reviews answered ...", flush=True)
            over["offline_same"] = offline_same(args, env, texts[:2], over["answered_texts"])
            runs.append(over)
        print("offline eval 2 ...", flush=True)
        off.append(offline(args, env, texts[:2]))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = "killed after 120 s"
    load_end = load_avg()
    offline_qps = statistics.mean(o["qps"] for o in off)
    lone_p50 = next((r["p50"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["vs_offline"] = r["qps"] / offline_qps
        r["p99_bound"] = 3 * lone_p50 + args.max_wait_ms / 1000 if lone_p50 else None
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "started": started,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads_per_process": args.threads},
        "load_start": load_start, "load_end": load_end, "settings": vars(args), "server_ready_s": ready_s,
        "offline": off, "offline_qps": offline_qps, "levels": rows, "server_exit_code": exit_code,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for over in runs:
        same = over["offline_same"]
        busy = over["server_metrics"].get('icl_model_busy_seconds_total{kind="classify"}', 0.0)
        over |= {"goodput_vs_offline_first_n": over["goodput_qps"] / offline_qps,
                 "goodput_vs_offline": over["goodput_qps"] / same["qps"],
                 "model_busy_s": busy, "model_utilisation": busy / over["wall_s"],
                 # per review answered in time: the model's seconds in the server against offline's
                 "busy_s_per_answer": busy / max(1, over["ok_within_deadline"]),
                 "offline_s_per_review": same["seconds"] / same["n"],
                 "lone_after_vs_quiet": over["lone_after_load_s"] / over["quiet_lone_p50_s"],
                 # the server's own clock, from the request reaching the app to its response: an
                 # answer takes a model pass (over 0.5 s), so what it finished within 0.1 s is a refusal
                 "server_rejections_over_100ms": over["rejected"] - over["server_metrics"].get(
                     'icl_request_duration_seconds_bucket{endpoint="/v1/classify",le="0.1"}', 0.0)}
        over["targets"] = overload_targets(over)
    if runs:
        result["overload_runs"] = runs
        (OUT / "serve_bench_overload.json").write_text(json.dumps(result, indent=2) + "\n")
        (OUT / "serve_bench_overload.md").write_text(overload_markdown(result) + "\n")
        print(overload_markdown(result))
        if not rows:
            return
    (OUT / "serve_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "serve_bench.md").write_text(markdown(result) + "\n")
    print(markdown(result))


def offline_same(args, env, warm: list[str], answered: list[int]) -> dict:
    """Offline evaluation of exactly the test reviews (indices, in order) the server answered."""
    from icl_engine.core.data import load_dataset

    records = load_dataset("rotten_tomatoes:test").records
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "answered.jsonl"
        path.write_text("".join(json.dumps({"text": records[i].input, "label": records[i].output}) + "\n"
                                for i in answered))
        return offline(args, env, warm, str(path), len(answered))


def metrics(url: str) -> dict:
    """The server's own counters of admission (rejections, drops, cancellations), its model
    thread's busy seconds, and its /v1/classify latency histogram (Prometheus text)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        wanted = any(w in name for w in ("admitted", "reject", "cancel", "drop", "busy")) or (
            name.startswith("icl_request_duration_seconds") and 'endpoint="/v1/classify"' in line)
        if not line.startswith("#") and wanted and not name.endswith("_created"):
            out[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def overload_targets(o: dict) -> dict:
    return {"goodput >= 90 % of offline on the same reviews": o["goodput_vs_offline"] >= 0.9,
            "p99 of a rejection <= 100 ms": o["rejection_p99_s"] is None or o["rejection_p99_s"] <= 0.1,
            "no 5xx but 503": o["errors_5xx_not_503"] == 0 and o["transport_errors"] == 0,
            "lone request after the load <= 2x quiet": o["lone_after_vs_quiet"] <= 2}


def overload_markdown(r: dict) -> str:
    runs, s = r["overload_runs"], r["settings"]
    o = runs[0]
    p = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        "# `icl serve` overloaded", "", f"`{r['command']}`, {r['started']}", "",
        f"Machine: {r['machine']['processor'] or 'CPU'}, {r['machine']['cpu_count']} CPUs; {s['threads']} torch "
        f"thread(s) per process. `uptime` at start: {r['load_start']}; at end: {r['load_end']}.", "",
        f"{len(runs)} runs on one server, each {o['clients']} closed-loop clients for {o['seconds']:g} s, k = {s['k']}, "
        f"each request's deadline {o['deadline_s']:g} s (the server's --timeout); a rejected client waits Retry-After; "
        "every client's connection pool is made before the run starts, and all start at once. "
        "Goodput is against the offline throughput on the same reviews: `icl eval` on exactly the reviews the server "
        "answered in time, after each run. Offline on the first "
        f"{s['offline']} test reviews: {r['offline_qps']:.2f} q/s (" + ", ".join(f"{x['qps']:.2f}" for x in r["offline"])
        + "). Busy: the server's icl_model_busy_seconds over the run's wall time.", "",
        "| run | requests | answered in time | goodput q/s | offline, same reviews q/s | vs offline | vs offline, "
        "first n | model busy | model s per answer / offline s per review | rejected | rejection p50 / p99 s "
        "| rejections over 0.1 s: client / server | answer p50 / p99 s | 5xx but 503 | lone after / quiet s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, o in enumerate(runs, 1):
        lines.append(
            f"| {i} | {o['requests']} | {o['ok_within_deadline']} | {o['goodput_qps']:.2f} | {o['offline_same']['qps']:.2f} "
            f"| {100 * o['goodput_vs_offline']:.0f} % | {100 * o['goodput_vs_offline_first_n']:.0f} % "
            f"| {100 * o['model_utilisation']:.0f} % | {o['busy_s_per_answer']:.3f} / {o['offline_s_per_review']:.3f} "
            f"| {o['rejected']} | {p(o['rejection_p50_s'])} / {p(o['rejection_p99_s'])} "
            f"| {len(o['rejections_over_100ms'])} / {o['server_rejections_over_100ms']:.0f} | {p(o['ok_p50_s'])} / "
            f"{p(o['ok_p99_s'])} | {o['errors_5xx_not_503'] + o['transport_errors']} | {o['lone_after_load_s']:.2f} / "
            f"{o['quiet_lone_p50_s']:.2f} |")
    lines += ["", "Targets, runs that met each: " + "; ".join(
        f"{name}: {sum(o['targets'][name] for o in runs)} of {len(runs)}" for name in runs[0]["targets"]) + ".", "",
              "Rejections over 0.1 s: by the client's clock (sent to answered, in the benchmark's 64 client threads) "
              "and by the server's (`icl_request_duration_seconds` of /v1/classify, from the request reaching the app "
              "to its response; every answer takes a model pass, so only refusals finish within 0.1 s). When the "
              "client's slow ones were sent (s into the run): " + "; ".join(
                  f"run {i}: " + (", ".join(f"{t:g}" for t, _ in o["rejections_over_100ms"]) or "none")
                  for i, o in enumerate(runs, 1)) + "."]
    return "\n".join(lines)


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# `icl serve` under load", "",
        f"`{r['command']}`, {r['started']}", "",
        f"Machine: {r['machine']['processor'] or 'CPU'}, {r['machine']['cpu_count']} CPUs, "
        f"{r['machine']['platform']}; {s['threads']} torch thread(s) per process (server, and `icl eval`). "
        f"Shared machine: `uptime` at start: {r['load_start']}; at end: {r['load_end']}.", "",
        f"Rotten Tomatoes test reviews, k = {s['k']}, default LM (SmolLM2-135M, float32) and embedder, index "
        f"`rotten_tomatoes` (built-in train split); server: --max-wait-ms {s['max_wait_ms']:g}, --batch-size "
        f"{s['batch_size']} (LM rows per forward, as `icl eval --batch-size`), --max-batch-size 64.", "",
        f"Offline evaluation (what `icl eval --limit {s['offline']}` runs, warmed like the server; same "
        "settings, its own process), before and after the clients: "
        + ", ".join(f"{o['qps']:.2f} q/s" for o in r["offline"]) + f"; mean {r['offline_qps']:.2f} q/s.", "",
        "| clients | requests | q/s | vs offline | p50 s | p95 s | p99 s | p99 bound s | mean texts per engine call "
        "| 4xx | 5xx | transport errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["levels"]:
        bound = "–" if x["p99_bound"] is None else f"{x['p99_bound']:.2f}"
        mean_b = "–" if x["mean_batch_texts"] is None else f"{x['mean_batch_texts']:.1f}"
        lines.append(f"| {x['clients']} | {x['requests']} | {x['qps']:.2f} | {100 * x['vs_offline']:.0f} % | "
                     f"{x['p50']:.2f} | {x['p95']:.2f} | {x['p99']:.2f} | {bound} | {mean_b} | {x['errors_4xx']} | "
                     f"{x['errors_5xx']} | {x['transport_errors']} |")
    lines += ["", "p99 bound = 3 x the lone request's p50 + the batching wait (the issue's target). "
              f"Server exit code after SIGTERM: {r['server_exit_code']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
