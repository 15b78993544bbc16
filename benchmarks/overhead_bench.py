"""The engine's own work around the LM, per query, split by stage: a CPU proxy for what a GPU's
host does while the LM runs.

    .venv/bin/python benchmarks/overhead_bench.py                     # writes results/overhead_bench.{json,md}
    .venv/bin/python benchmarks/overhead_bench.py --label mine --reference benchmarks/results/overhead_bench.json \
        --out /tmp/mine                                               # a change against the current results

On a GPU the LM is fast and the Python work around it dominates; here the LM is a tiny random
Llama built from a config (1 layer, hidden 16, the SmolLM2 vocabulary and tokenizer, so prompt
lengths are the real ones) whose forward costs next to nothing, and everything else is the real
engine: `evaluate()` over the first N Rotten Tomatoes test queries (after one warm-up pass over
them), kNN at k, the built-in sentiment template (its instruction is the cached prefix), once
per embedder. Queries per engine call: evaluate's default (CHUNK_BATCHES LM batches), or --chunk.

Stages (wall and process CPU seconds, summed over the run, reported as ms per query):
  embed       Embedder.encode of the queries (no embedding cache, as for new queries)
  search      ExampleIndex.search inside selection (faiss, at --threads threads)
  select      the rest of select.select_many (candidates, exclusion, packing, order)
  tokenize    the queries' tokenization, the rest of Engine.select (token budgets) and
              Engine._prompts (prompt assembly)
  batch       launch_scores (score_continuations before) less the LM forward: checks, length
              buckets, padded tensors
  lm          the LM's forward calls (forward pre-hook to forward hook)
  post        everything else: scores -> Predictions, evaluate()'s metrics and records
Library calls inside those, CPU time: `bpe` (PromptBuilder.encode_many, the Rust
tokenizer, inside tokenize), `log_softmax` (every Tensor.log_softmax, the one over the vocabulary
after the LM, inside batch) and `search_matmul` (FirstPass.scores, flat_topk's first-pass matmul,
inside search); `host` is non-LM work less embed and log_softmax: what a GPU's host
does per query, the log-softmax running on the device there.
Target: non-LM work, embedding apart, <= 0.2 ms per query. The log-scores are kept (hashing
embedder) so a later run can show its predictions equal these (`--reference`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import torch  # noqa: E402

from icl_engine.core import pipeline  # noqa: E402
from icl_engine.core.choices import DEFAULT_EMBEDDER
from icl_engine.core.data import load_dataset  # noqa: E402
from icl_engine.core.embed import get_embedder  # noqa: E402
from icl_engine.core.engines import freeze_loaded_heap  # noqa: E402
from icl_engine.core.evaluate import evaluate  # noqa: E402
from icl_engine.core.index import ExampleIndex, FirstPass  # noqa: E402
from icl_engine.core.lm import LM, cache_root  # noqa: E402
from icl_engine.core.pipeline import Engine, PipelineConfig  # noqa: E402
from icl_engine.core.registry import SENTIMENT_TEMPLATE  # noqa: E402

DATA = Path(os.environ.get("ICL_SHARED_DATA") or ROOT.parent / "shared" / "data")
STAGES = ("embed", "search", "select", "tokenize", "batch", "lm", "post")
PARTS = ("bpe", "log_softmax", "search_matmul")  # inside tokenize, batch, search: library calls


def tiny_lm(tokenizer_dir: str, seed: int = 0) -> LM:
    """A random 1-layer Llama with the SmolLM2 vocabulary: real prompt lengths, near-zero cost."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.2)
    return LM(LlamaForCausalLM(cfg).eval(), tok, "tiny-random-smollm2-vocab", torch.device("cpu"))


class Stages:
    """Time per stage, by wrapping the engine's stage entry points on this engine only: wall
    seconds (`clock=time.perf_counter`) or process CPU seconds (`time.process_time`, all threads:
    what a busy machine cannot inflate by taking the core away)."""

    KEYS = ("embed", "embed_in_select", "select_many", "search", "engine_select", "prompts", "query_ids", "score",
            "lm", "bpe", "log_softmax", "search_matmul")

    def __init__(self, engine: Engine):
        self.t = {c: dict.fromkeys(self.KEYS, 0.0) for c in ("wall", "cpu")}
        self._undo: list[tuple] = []
        # the wrapped calls running now: the engine embeds a call's queries inside Engine.select,
        # or once before it when one call holds several query options
        self._inside: list[str] = []
        self._wrap(engine.embedder, "encode", "embed")
        self._wrap(engine, "select", "engine_select")
        self._wrap(engine, "_prompts", "prompts")
        self._wrap(engine.index, "search", "search")
        if hasattr(engine.builder, "query_ids_many"):  # the batched tokenization (absent from older engines)
            self._wrap(engine.builder, "query_ids_many", "query_ids")
        if hasattr(engine.builder, "encode_many"):  # inside tokenize: the tokenizer's own call
            self._wrap(engine.builder, "encode_many", "bpe")
        # inside batch: the log-softmax over the vocabulary after the LM (on a GPU it runs there)
        self._wrap(torch.Tensor, "log_softmax", "log_softmax")
        # inside search: flat_topk's first-pass matmul (every FirstPass.scores call)
        self._wrap(FirstPass, "scores", "search_matmul")
        self._wrap(pipeline, "select_many", "select_many")
        # the engine's scoring entry point: launch_scores since the GPU pipeline (on a CPU its
        # scores are ready when it returns), score_continuations before
        self._wrap(pipeline, "launch_scores" if hasattr(pipeline, "launch_scores") else "score_continuations", "score")
        self._start = (0.0, 0.0)
        self.gc = {"cpu_s": 0.0, "full": 0, "young": 0}  # the collector's own time, inside the stages above
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)
        engine.lm.model.register_forward_pre_hook(self._pre)
        engine.lm.model.register_forward_hook(self._post)

    def _add(self, key: str, start: tuple[float, float]) -> None:
        self.t["wall"][key] += time.perf_counter() - start[0]
        self.t["cpu"][key] += time.process_time() - start[1]

    def _wrap(self, obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            start = time.perf_counter(), time.process_time()
            self._inside.append(key)
            try:
                return fn(*a, **kw)
            finally:
                self._inside.pop()
                self._add(key, start)
                if key == "embed" and "engine_select" in self._inside:
                    self._add("embed_in_select", start)

        setattr(obj, name, timed)
        self._undo.append((obj, name, fn))

    def close(self) -> None:
        """Put back what _wrap replaced (torch.Tensor.log_softmax is the whole process's)."""
        for obj, name, fn in reversed(self._undo):
            setattr(obj, name, fn)
        self._undo.clear()

    def _pre(self, *_):
        self._start = time.perf_counter(), time.process_time()

    def _post(self, *_):
        self._add("lm", self._start)

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.process_time()
            return
        self.gc["cpu_s"] += time.process_time() - self._gc_start
        self.gc["full" if info["generation"] == 2 else "young"] += 1

    def reset(self) -> None:
        self.t = {c: dict.fromkeys(self.KEYS, 0.0) for c in self.t}
        self.gc = dict.fromkeys(self.gc, 0) | {"cpu_s": 0.0}

    def split(self, clock: str, total: float) -> dict[str, float]:
        t = self.t[clock]
        # the queries' tokenization runs before Engine.select when the caller batches it, and so
        # may their embedding
        outside = t["embed"] - t["embed_in_select"]
        return {"embed": t["embed"], "search": t["search"], "select": t["select_many"] - t["search"],
                "tokenize": t["engine_select"] - t["embed_in_select"] - t["select_many"] + t["prompts"] + t["query_ids"],
                "batch": t["score"] - t["lm"], "lm": t["lm"],
                "post": total - t["engine_select"] - t["prompts"] - t["query_ids"] - t["score"] - outside,
                "bpe": t["bpe"], "log_softmax": t["log_softmax"], "search_matmul": t["search_matmul"]}


def run_embedder(name: str, lm: LM, pool, test, args) -> dict:
    emb = get_embedder(name)
    t0 = time.perf_counter()
    index = ExampleIndex.build(pool, emb)
    build_s = time.perf_counter() - t0
    emb.cache = None  # queries are new: embedded in every run
    if args.embed_batch_size:
        emb.batch_size = args.embed_batch_size
    cfg = PipelineConfig(index="rt", method="knn", k=args.k, batch_size=args.batch_size)
    engine = Engine.from_parts(cfg, index, emb, lm, SENTIMENT_TEMPLATE)
    stages = Stages(engine)
    # Warm-up: one pass over the test queries. The first pass also tokenizes the pool rows the
    # queries reach for their token lengths (once per engine), which would otherwise land in the
    # first repeat's `select`.
    evaluate(engine, test, k=args.k, progress=False, chunk=args.chunk)
    if args.gc_freeze:  # what the icl command, icl serve and the Ray actors do once an engine is loaded
        freeze_loaded_heap()
    runs = []
    for _ in range(args.repeats):
        stages.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate(engine, test, k=args.k, progress=False, chunk=args.chunk)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs.append({"wall": {"total": total, **stages.split("wall", total)},
                     "cpu": {"total": cpu, **stages.split("cpu", cpu)}, "gc": dict(stages.gc)})
        print(f"{name}: {total:.2f} s ({cpu:.2f} CPU s), "
              + ", ".join(f"{s} {runs[-1]['wall'][s]:.2f}" for s in STAGES)
              + f"; gc {runs[-1]['gc']['cpu_s']:.3f} CPU s ({runs[-1]['gc']['full']} full)", file=sys.stderr)
    stages.close()
    n = res["n"]
    ms = {clock: per_query(runs, clock, n) for clock in ("wall", "cpu")}
    return {"embedder": emb.name, "index_build_s": build_s, "n": n, "accuracy": res["accuracy"],
            "mean_prompt_tokens": res["mean_prompt_tokens"], "runs": runs, "ms_per_query": ms,
            "predictions": [p["label"] for p in res["predictions"]],
            "engine": engine}


def per_query(runs: list[dict], clock: str, n: int) -> dict[str, float]:
    """Medians over the repeats, in ms per query, plus the non-LM sums."""
    med = lambda f: 1e3 * statistics.median(f(r[clock]) for r in runs) / n  # noqa: E731
    ms = {s: med(lambda r, s=s: r[s]) for s in (*STAGES, "total", *PARTS)}
    ms["non_lm"] = med(lambda r: r["total"] - r["lm"])
    ms["non_lm_non_embed"] = med(lambda r: r["total"] - r["lm"] - r["embed"])
    ms["host"] = med(lambda r: r["total"] - r["lm"] - r["embed"] - r["log_softmax"])
    ms["non_lm_non_embed_non_search"] = med(lambda r: r["total"] - r["lm"] - r["embed"] - r["search"])
    return ms


def log_scores(engine: Engine, texts: list[str], k: int) -> list[list[float]]:
    return [p.log_scores for p in engine.classify(texts, k=k)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64, help="the engine's batch size (PipelineConfig.batch_size)")
    p.add_argument("--chunk", type=int, default=None,
                   help="queries per engine call (evaluate's chunk; default: evaluate's, CHUNK_BATCHES LM batches)")
    p.add_argument("--embed-batch-size", type=int, default=None, help="override the embedder's batch size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokenizer-threads", action="store_true",
                   help="with --threads 1, leave the tokenizer's own thread pool on")
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once the engine is loaded and warm")
    p.add_argument("--embedders", nargs="+", default=["hashing:384", DEFAULT_EMBEDDER])
    p.add_argument("--tokenizer", default=str(cache_root() / "models" / "smollm2-135m-instruct"))
    p.add_argument("--label", default="current", help="the run's name in its report")
    p.add_argument("--name", default="overhead_bench", help="result files: NAME.json and NAME.md under --out")
    p.add_argument("--reference", default=None, help="an earlier result JSON: compare predictions and log-scores")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)  # the index search: same thread count as the LM
    if args.threads == 1 and not args.tokenizer_threads:
        # the tokenizer's Rust thread pool too: spread over every core it costs more CPU per query
        # than on one, and on a shared machine it waits for cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    lm = tiny_lm(args.tokenizer)
    pool = load_dataset(str(DATA / "rotten_tomatoes_train.jsonl"))
    test = load_dataset(str(DATA / "rotten_tomatoes_test.jsonl")).select(range(args.n))
    load_start = os.getloadavg()
    results = {}
    for name in args.embedders:
        r = run_embedder(name, lm, pool, test, args)
        engine = r.pop("engine")
        r["log_scores_exact"] = log_scores(engine, [x.input for x in test.records], args.k)
        results[r["embedder"]] = r

    out = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "label": args.label,
           "command": " ".join(["benchmarks/overhead_bench.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "torch_threads": args.threads, "gc_freeze": args.gc_freeze,
                       "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default"),
                       "load_average_at_start": list(load_start),
                       "load_average_at_end": list(os.getloadavg()), "torch": torch.__version__},
           "config": {"n": args.n, "k": args.k, "batch_size": args.batch_size, "chunk": args.chunk, "repeats": args.repeats,
                      "lm": lm.name, "lm_params": lm.n_params, "template": "rotten_tomatoes built-in (instruction)"},
           "embedders": results}
    if args.reference:
        out["reference"] = compare(json.loads(Path(args.reference).read_text()), results)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{args.name}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    (dest / f"{args.name}.md").write_text(markdown(out))
    print(markdown(out))
    return out


def compare(ref: dict, results: dict) -> dict:
    """Predictions equal, and the largest log-score difference, per embedder in both runs."""
    out = {"file_created": ref["created"], "label": ref["label"]}
    for name, r in results.items():
        if name not in ref["embedders"]:
            continue
        a, b = ref["embedders"][name], r
        m = min(len(a["predictions"]), len(b["predictions"]))
        out[name] = {"n": m, "predictions_equal": a["predictions"][:m] == b["predictions"][:m],
                     "max_abs_log_score_diff": float(np.max(np.abs(np.asarray(a["log_scores_exact"][:m])
                                                                   - np.asarray(b["log_scores_exact"][:m]))))}
    return out


def markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [f"# Overhead around the LM ({r['label']})", "", f"`{r['command']}`, {r['created']}", "",
             f"n = {c['n']} Rotten Tomatoes test queries, kNN k = {c['k']}, engine batch size {c['batch_size']}, "
             f"{c.get('chunk') or 'default'} queries per engine call, "
             f"{c['repeats']} repeat(s) (medians), {m['torch_threads']} torch thread(s) (tokenizer's thread pool: "
             f"{m.get('tokenizers_parallelism', 'default')}; gc.freeze: {m.get('gc_freeze', False)}); LM: {c['lm']} "
             f"({c['lm_params'] / 1e6:.2f} M parameters, the SmolLM2 tokenizer). Load average "
             f"{m['load_average_at_start'][0]:.2f} at start, {m['load_average_at_end'][0]:.2f} at end "
             f"({m['cpus']} CPUs, shared with other jobs).", "",
             "Milliseconds per query, wall clock and process CPU time (all threads; a busy machine "
             "inflates the first, hardly the second). search: the index search inside selection; "
             "select: the rest of selection.", "",
             "| embedder | clock | embed | search | select | tokenize/assemble | batch | LM | post | total | "
             "non-LM | non-LM, embed apart | non-LM, embed and search apart | accuracy | prompt tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cols = (*STAGES, "total", "non_lm", "non_lm_non_embed", "non_lm_non_embed_non_search")
    for name, e in r["embedders"].items():
        for clock in ("wall", "cpu"):
            x = e["ms_per_query"][clock]
            lines.append(f"| {name} | {clock} | " + " | ".join(f"{x[s]:.3f}" for s in cols)
                         + f" | {e['accuracy']:.3f} | {e['mean_prompt_tokens']:.1f} |")
    lines += ["", "Library calls inside those stages, CPU ms a query: the queries' BPE (the Rust tokenizer's "
              "call, inside tokenize), the log-softmax over the LM's vocabulary (inside batch; on a GPU it "
              "runs on the device, after the LM), and the search's first-pass matmul (inside search). "
              "floor: their sum. host: non-LM work, embed and log-softmax apart, the CPU work a GPU's host "
              "does per query.", "",
              "| embedder | BPE | log-softmax | search matmul | floor | non-LM, embed apart | host |",
              "|---|---|---|---|---|---|---|"]
    for name, e in r["embedders"].items():
        x = e["ms_per_query"]["cpu"]
        floor = x["bpe"] + x["log_softmax"] + x["search_matmul"]
        lines.append(f"| {name} | {x['bpe']:.3f} | {x['log_softmax']:.3f} | {x['search_matmul']:.3f} | "
                     f"{floor:.3f} | {x['non_lm_non_embed']:.3f} | {x['host']:.3f} |")
    lines += ["", "The garbage collector's own CPU time (inside the stages above), mean over all repeats, and "
              "the full (oldest-generation) collections in each repeat:"]
    for name, e in r["embedders"].items():
        g = [run["gc"] for run in e["runs"] if "gc" in run]
        if g:
            lines.append(f"- {name}: {1e3 * sum(x['cpu_s'] for x in g) / (len(g) * e['n']):.3f} ms per query; "
                         f"full collections {[x['full'] for x in g]}")
    if "reference" in r:
        ref = r["reference"]
        lines += ["", f"Against `{ref['label']}` ({ref['file_created']}):"]
        for name, v in ref.items():
            if isinstance(v, dict):
                lines.append(f"- {name}: predictions equal on all {v['n']}: {v['predictions_equal']}; "
                             f"max |log-score difference| {v['max_abs_log_score_diff']:.2e}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
