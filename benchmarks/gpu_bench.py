"""Classification throughput on one GPU: bfloat16, LM batch sizes 64..1024, MFU against
a bfloat16 matmul measured in the same run, agreement with the float32 CPU engine's predictions.

Runs from a plain checkout: torch, transformers and numpy are enough (no faiss, no gguf, no
packaged wheels). The LM is a Hugging Face folder given by path (the converted SmolLM2 lives in
~/.cache/icl_engine/models/smollm2-135m-instruct), the embedder is `hashing:384` (no model), the
pool and queries are JSONL files, and the index is an exact inner-product search in torch on the
same device (`TorchFlatIndex`: what the engine asks of an index, without faiss).

    # on the GPU machine (benchmarks/gpu_bench.sh wraps this):
    python benchmarks/gpu_bench.py --lm MODEL_DIR --data DATA_DIR
    # here, once: the float32 CPU predictions the GPU run is compared with (shipped in the repo)
    .venv/bin/python benchmarks/gpu_bench.py --device cpu --dtype float32 --n 200 --batch-sizes 8 \
        --write-reference benchmarks/results/gpu/cpu_float32_predictions.json

Writes benchmarks/results/gpu/gpu_bench.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import json
import os
import platform
import pstats
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from icl_engine.core.data import Dataset, load_dataset  # noqa: E402
from icl_engine.core.embed import get_embedder  # noqa: E402
from icl_engine.core.evaluate import evaluate  # noqa: E402
from icl_engine.core.lm import cache_root, compile_lm, load_lm  # noqa: E402
from icl_engine.core.pipeline import Engine, PipelineConfig  # noqa: E402
from icl_engine.core.registry import SENTIMENT_TEMPLATE  # noqa: E402

REFERENCE = ROOT / "benchmarks" / "results" / "gpu" / "cpu_float32_predictions.json"


class TorchFlatIndex:
    """Exact top-k by inner product with torch on `device`: records, labels, kind, vectors
    [n, d] and search(query_vectors [q, d], k) -> (scores float32 [q, k], ids int64 [q, k]), as
    ExampleIndex gives them (k <= n here).

    The same demonstrations on every device: scores are summed in float64 and rounded to
    float32, so sums that differ only by summation order (a GPU and a CPU matmul) round to the
    same value, and equal scores go to the lower row id. Without this the hashing embedder's
    many exact ties made the GPU pick other demonstrations than the CPU for 18 % of queries."""

    MARGIN = 16  # candidates past k, so ties across the k-th place are ordered by id too

    def __init__(self, dataset: Dataset, vectors: np.ndarray, device: torch.device):
        self.records, self.labels, self.kind = dataset.records, dataset.labels, dataset.kind
        self.vectors = np.ascontiguousarray(vectors, np.float32)  # [n, d]
        self._v = torch.from_numpy(self.vectors).to(device, torch.float64)  # [n, d]

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(query_vectors, np.float64)).to(self._v.device)  # [q, d]
        s = (q @ self._v.T).float()  # [q, n]
        s, i = torch.topk(s, min(int(k) + self.MARGIN, len(self.records)), dim=1)  # [q, k+m]
        s, i = s.cpu().numpy(), i.cpu().numpy().astype(np.int64)
        order = np.lexsort((i, -s), axis=1)[:, : int(k)]  # best score first, then lower id
        return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


class TokenCounter:
    """Real tokens fed to the LM (forward pre-hook; the attention mask's last T columns). The
    counts stay on the device until read: turning one into a Python int would wait for the GPU
    in the middle of the engine's pipeline."""

    def __init__(self):
        self.counts: list = []
        self.padded = 0  # positions the forwards ran, padding included (from shapes: no wait)

    def __call__(self, module, args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None:
            return
        T = ids.shape[1]
        self.counts.append(mask[:, -T:].sum() if mask is not None and mask.ndim == 2 else ids.numel())
        self.padded += ids.numel()

    @property
    def tokens(self) -> int:
        return int(sum(int(c) for c in self.counts))

    def reset(self) -> None:
        self.counts, self.padded = [], 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Sustained [size, size] @ [size, size] throughput on `device`, TFLOP/s."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        iters += 10
        sync(device)
    return 2 * size**3 * iters / (time.perf_counter() - t0) / 1e12


def build_engine(args, device: torch.device, dtype: str, batch_size: int) -> tuple[Engine, TokenCounter]:
    lm = load_lm(args.lm, device=device, dtype=dtype)
    counter = TokenCounter()
    lm.model.register_forward_pre_hook(counter, with_kwargs=True)
    emb = get_embedder(args.embedder, cache_dir=False, device=str(device))
    pool = load_dataset(str(Path(args.data) / "rotten_tomatoes_train.jsonl"))
    index = TorchFlatIndex(pool, emb.encode([r.input for r in pool.records]), device)
    cfg = PipelineConfig(index="rotten_tomatoes", lm=args.lm, method="knn", k=args.k, batch_size=batch_size)
    engine = Engine.from_parts(cfg, index, emb, lm, SENTIMENT_TEMPLATE)  # the prefix runs eager, once
    if args.compile:  # the engine's --compile (dynamic shapes: one graph for every batch and length)
        compile_lm(lm)
    return engine, counter


def run(engine: Engine, counter: TokenCounter, test: Dataset, batch_size: int, overlap: bool | None,
        repeats: int, chunk_batches: int | None = None) -> dict:
    """`chunk_batches`: queries per engine call, in LM batches (the length buckets choose among
    them); None: evaluate's default."""
    engine.config.batch_size = batch_size
    dev = engine.lm.device
    chunk = None if chunk_batches is None else chunk_batches * batch_size
    evaluate(engine, test.select(range(min(len(test), 2 * batch_size))), progress=False)  # warm-up
    secs, res = [], None
    for _ in range(repeats):
        counter.reset()
        sync(dev)
        t0 = time.perf_counter()
        res = evaluate(engine, test, progress=False, overlap=overlap, chunk=chunk)
        sync(dev)
        secs.append(time.perf_counter() - t0)
    s = statistics.median(secs)
    return {"batch_size": batch_size, "chunk_batches": chunk_batches, "overlap": overlap, "seconds": secs,
            "queries_per_s": res["n"] / s, "tokens": counter.tokens, "padded_tokens": counter.padded,
            "model_tflops": 2 * engine.lm.n_params * counter.tokens / s / 1e12,
            "non_embedding_tflops": 2 * non_embedding_params(engine.lm) * counter.tokens / s / 1e12,
            "accuracy": res["accuracy"], "mean_prompt_tokens": res["mean_prompt_tokens"],
            "predictions": [p["label"] for p in res["predictions"]],
            "demos": [p["demo_ids"] for p in res["predictions"]]}


def non_embedding_params(lm) -> int:
    """Parameters a token's forward multiplies by: all but the input embedding (the tied lm_head
    runs at the last position only, logits_to_keep=1)."""
    return lm.n_params - lm.model.get_input_embeddings().weight.numel()


def stages(engine: Engine, test: Dataset, batch_size: int, top: int = 30) -> dict:
    """One pass without overlap, timed by stage with the device synchronised around the LM call:
    prepare (embed, select, assemble; CPU), lm (score_batch: padding, copies, both forwards),
    the rest of finish (calibration, Predictions), plus cProfile's top functions by own time."""
    engine.config.batch_size = batch_size
    lm, dev = engine.lm, engine.lm.device
    texts = [r.input for r in test.records]
    t = {"prepare": 0.0, "lm": 0.0, "finish_rest": 0.0}
    inner = lm.score_batch

    def timed(*a, **kw):
        sync(dev)
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        sync(dev)
        t["lm"] += time.perf_counter() - t0
        return out

    lm.score_batch = timed  # an instance attribute: the class's method is untouched
    prof = cProfile.Profile()
    try:
        t_all = time.perf_counter()
        prof.enable()
        for i in range(0, len(texts), batch_size):
            t0 = time.perf_counter()
            ready = engine.prepare(texts[i : i + batch_size])
            t1 = time.perf_counter()
            lm_before = t["lm"]
            engine.finish(ready)
            t["prepare"] += t1 - t0
            t["finish_rest"] += time.perf_counter() - t1 - (t["lm"] - lm_before)
        prof.disable()
        total = time.perf_counter() - t_all
    finally:
        del lm.score_batch
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    n = len(texts)
    return {"batch_size": batch_size, "n": n, "seconds": total, "ms_per_query": {k: 1e3 * v / n for k, v in t.items()},
            "note": "under cProfile: Python-heavy stages read slower than without it",
            "profile_tottime": buf.getvalue()}


def agreement(run_: dict, ref: dict | None) -> dict | None:
    if ref is None:
        return None
    m = min(len(run_["predictions"]), len(ref["predictions"]))
    return {"n": m, "predictions_agree": sum(a == b for a, b in zip(run_["predictions"], ref["predictions"])) / m,
            "demos_identical": sum(a == b for a, b in zip(run_["demos"], ref["demos"])) / m}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", default=str(cache_root() / "models" / "smollm2-135m-instruct"),
                   help="a Hugging Face model folder (no GGUF conversion on the GPU machine)")
    p.add_argument("--data", default=os.environ.get("ICL_SHARED_DATA") or str(ROOT.parent / "shared" / "data"),
                   help="folder with rotten_tomatoes_train.jsonl and rotten_tomatoes_test.jsonl")
    p.add_argument("--embedder", default="hashing:384")
    p.add_argument("--n", type=int, default=1000,
                   help="the first N test queries; past the test set's size it is cycled (a steady-state rate)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--float32-check", action="store_true",
                   help="also run float32 on the device at the largest batch (agreement with the CPU)")
    p.add_argument("--overlap", choices=["auto", "on", "off", "both"], default="both",
                   help="prepare the next chunk in a thread while the LM runs (evaluate's overlap)")
    p.add_argument("--chunk-batches", type=int, nargs="+", default=[0],
                   help="queries per engine call in LM batches, so the length buckets have a choice "
                        "(0: evaluate's default)")
    p.add_argument("--compile", action="store_true", help="the engine's compile option (LM.compile: torch.compile)")
    p.add_argument("--stages", action="store_true",
                   help="also one pass at the largest batch timed by stage, under cProfile")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--matmul-seconds", type=float, default=3.0)
    p.add_argument("--reference", default=str(REFERENCE), help="float32 CPU predictions to compare with")
    p.add_argument("--write-reference", default=None, help="write this run's predictions as the reference file")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here (use --device cpu for the reference file)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the --float32-check)

    test = load_dataset(str(Path(args.data) / "rotten_tomatoes_test.jsonl"))
    test = test.select([i % len(test) for i in range(args.n)])  # cycled past its size
    ref = json.loads(Path(args.reference).read_text()) if Path(args.reference).is_file() else None
    mm_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype, torch.float32)
    tflops = matmul_tflops(device, mm_dtype, args.matmul_size, args.matmul_seconds)
    print(f"{args.dtype} matmul: {tflops:.1f} TFLOP/s", file=sys.stderr)

    engine, counter = build_engine(args, device, args.dtype, max(args.batch_sizes))
    # what the icl command does once it has loaded an engine (engines.freeze_loaded_heap; this
    # script does not import engines.py, which needs faiss): no full collections over the heap
    gc.collect()
    gc.freeze()
    overlaps = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.overlap]
    runs = []
    for bs, cb, ov in itertools.product(args.batch_sizes, args.chunk_batches, overlaps):
        r = run(engine, counter, test, bs, ov, args.repeats, cb or None)
        r["mfu"] = r["model_tflops"] / tflops
        r["mfu_non_embedding"] = r["non_embedding_tflops"] / tflops
        r["agreement_with_cpu_float32"] = agreement(r, ref)
        runs.append(r)
        a = r["agreement_with_cpu_float32"]
        print(f"batch {bs} chunk {cb or 'default'} overlap {ov}: {r['queries_per_s']:.0f} q/s, MFU {r['mfu']:.1%}, "
              f"padding {r['padded_tokens'] / r['tokens'] - 1:.1%}"
              + (f", agree {a['predictions_agree']:.1%}" if a else ""), file=sys.stderr)
    stage_split = stages(engine, test, max(args.batch_sizes)) if args.stages else None
    if stage_split:
        print(f"stages (ms/query): {stage_split['ms_per_query']}", file=sys.stderr)
    f32 = None
    if args.float32_check and args.dtype != "float32":
        e32, c32 = build_engine(args, device, "float32", max(args.batch_sizes))
        f32 = run(e32, c32, test, max(args.batch_sizes), None, 1)
        f32["agreement_with_cpu_float32"] = agreement(f32, ref)

    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["benchmarks/gpu_bench.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "python": platform.python_version(), "cpu": cpu_name(),
                          "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
              "config": {"n": len(test), "k": args.k, "dtype": args.dtype, "lm": args.lm, "lm_params": engine.lm.n_params,
                         "embedder": args.embedder, "template": "rotten_tomatoes built-in (instruction cached)",
                         "compile": args.compile, "attention": engine.lm.model.config._attn_implementation,
                         "lm_non_embedding_params": non_embedding_params(engine.lm)},
              "matmul_tflops": tflops, "runs": runs, "stages": stage_split, "float32_check": f32,
              "reference": None if ref is None else {"file": args.reference, "created": ref.get("created")}}
    if args.write_reference:
        best = runs[0]
        write(Path(args.write_reference), {
            "created": result["created"], "command": result["command"], "machine": result["machine"],
            "config": result["config"], "predictions": best["predictions"], "demos": best["demos"],
            "accuracy": best["accuracy"]})
    for r in runs + ([f32] if f32 else []):  # per-query lists: 4,000+ rows a run; the agreement keeps what counts
        r.pop("predictions", None)
        r.pop("demos", None)
    publish(Path(args.out), "gpu_bench", result, markdown(result))
    return result


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def publish(out: Path, stem: str, result: dict, md: str) -> None:
    """OUT/STEM.json and OUT/STEM.md, and the markdown on stdout."""
    write(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(md)
    print(md)


def write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def markdown(r: dict) -> str:
    c = r["config"]
    lines = ["# Classification on one device", "", f"`{r['command']}`, {r['created']}", "",
             f"{r['machine']['device']} ({r['machine'].get('cpu', '?')}, {r['machine']['cpus']} CPUs), "
             f"torch {r['machine']['torch']}, transformers {r['machine'].get('transformers', '?')}; "
             f"n = {c['n']} Rotten Tomatoes test queries{' (the 1,066 cycled)' if c['n'] > 1066 else ''}, "
             f"kNN k = {c['k']} ({c['embedder']}), LM `{Path(c['lm']).name}` ({c['lm_params'] / 1e6:.1f} M parameters, "
             f"{c['dtype']}, attention {c['attention']}, compile {c['compile']}). {c['dtype']} matmul "
             f"{r['matmul_tflops']:.1f} TFLOP/s measured in this run.", "",
             "MFU counts 2·N·tokens with N all parameters; the non-embedding column leaves out the input "
             "embedding (the tied LM head runs at the last position only).", "",
             "| LM batch | chunk (batches) | overlap | queries/s | model TFLOP/s | MFU | MFU non-embedding | padding "
             "| accuracy | prompt tokens | predictions = CPU float32 | demos = CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        a = x["agreement_with_cpu_float32"]
        agree = f"{a['predictions_agree']:.1%} of {a['n']}" if a else "–"
        demos = f"{a['demos_identical']:.1%}" if a else "–"
        pad = f"{x['padded_tokens'] / x['tokens'] - 1:.1%}" if x.get("padded_tokens") else "–"
        lines.append(f"| {x['batch_size']} | {x.get('chunk_batches') or 'default'} | {x['overlap']} | "
                     f"{x['queries_per_s']:.1f} | {x['model_tflops']:.2f} | "
                     f"{x['mfu']:.1%} | {x.get('mfu_non_embedding', float('nan')):.1%} | {pad} | {x['accuracy']:.3f} | "
                     f"{x['mean_prompt_tokens']:.1f} | {agree} | {demos} |")
    st = r.get("stages")
    if st:
        ms = st["ms_per_query"]
        lines += ["", f"Stages at batch {st['batch_size']}, no overlap, under cProfile ({st['n']} queries, "
                  f"{st['seconds']:.2f} s): " + ", ".join(f"{k} {v:.3f} ms/query" for k, v in ms.items()) + "."]
    f = r["float32_check"]
    if f:
        a = f["agreement_with_cpu_float32"]
        lines += ["", f"float32 on the device, batch {f['batch_size']}: {f['queries_per_s']:.1f} queries/s"
                  + (f", predictions = CPU float32 on {a['predictions_agree']:.1%} of {a['n']}" if a else "") + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
