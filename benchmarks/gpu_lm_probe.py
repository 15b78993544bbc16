"""Where the GPU time of a scoring batch goes, and what cuts it.

gpu_bench.py showed the LM forward, not the engine's Python, bounds throughput on an H200
(0.74 ms of ~0.95 ms per query at batch 2048, MFU ~12 %). This probe times one batch of real
k = 8 prompts through the LM alone, in several variants, each against the eager result:

  eager          HFBackend.score_batch as the engine runs it (prefix KV cache, sdpa)
  nocache        the whole prompt (shared instruction included) in one pass, use_cache=False
  layers         each decoder layer's RMSNorms and MLP compiled (torch.compile per module)
  compile        the model's forward compiled (torch.compile, dynamic shapes): gpu_bench --compile
  compile_nocache  both of the last two ideas: compiled forward, no cache

and, with --profile, torch.profiler's table of the eager batch's CUDA kernels.

    python benchmarks/gpu_lm_probe.py --lm MODEL --data DATA [--batch-sizes 1024 2048] [--profile]

Writes gpu_lm_probe.json and .md under --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import ROOT, build_engine, publish, sync  # noqa: E402

from icl_engine.core.backends.hf import left_pad  # noqa: E402
from icl_engine.core.data import load_dataset  # noqa: E402

VARIANTS = ("eager", "nocache", "layers", "compile", "compile_nocache")


def nocache_scores(lm, rows: list[list[int]], label_first: list[int]) -> torch.Tensor:
    """log p(label's first token | whole prompt): [B, L], one pass, no KV cache kept."""
    cuda = lm.device.type == "cuda"
    ids, mask = ((torch.from_numpy(a).pin_memory() if cuda else torch.from_numpy(a)).to(lm.device, non_blocking=cuda)
                 for a in left_pad(rows, lm.tokenizer.pad_token_id or 0))  # [B, T] each
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # [B, T]
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float().log_softmax(-1)[:, label_first]  # [B, L]


def compile_layers(model) -> None:
    """Compile the memory-bound parts of every decoder layer (norms, gated MLP); attention and
    its cache stay eager, so no graph ever holds the cache object."""
    base = model.model
    for layer in base.layers:
        layer.input_layernorm.compile(dynamic=True)
        layer.post_attention_layernorm.compile(dynamic=True)
        layer.mlp.compile(dynamic=True)
    base.norm.compile(dynamic=True)


def time_it(fn, repeats: int, device) -> tuple[float, float, torch.Tensor]:
    """(first call's seconds, median of `repeats` later calls, the last result)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    fn()  # a second warm call: dynamic-shape compiles may specialise once more
    secs = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        secs.append(time.perf_counter() - t0)
    return first, statistics.median(secs), out


def profile_table(fn, device, rows: int = 25) -> str:
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync(device)
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            return ka.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, RuntimeError):
            continue
    return ka.table(row_limit=rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--embedder", default="hashing:384")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = p.parse_args(argv)
    args.compile = False
    device = torch.device(args.device)
    test = load_dataset(str(Path(args.data) / "rotten_tomatoes_test.jsonl"))
    texts = [test.records[i % len(test)].input for i in range(max(args.batch_sizes))]

    result = {"command": " ".join(["benchmarks/gpu_lm_probe.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "runs": [], "profile": None}
    engine = None
    for variant in args.variants:
        if engine is None or variant in ("layers", "compile", "compile_nocache"):
            engine, _ = build_engine(args, device, args.dtype, max(args.batch_sizes))  # a fresh, uncompiled LM
            torch._dynamo.reset()
        lm, labels = engine.lm, [engine.builder.label_ids(lab) for lab in engine.index.labels]
        if variant == "layers":
            compile_layers(lm.model)
        if variant.startswith("compile"):
            lm.model.forward = torch.compile(lm.model.forward, dynamic=True)
        for B in args.batch_sizes:
            prompts = engine.prepare(texts[:B]).prompts
            tail = [list(q.ids[q.shared_len:]) for q in prompts]  # after the cached prefix
            whole = [list(q.ids) for q in prompts]
            if variant.endswith("nocache"):
                if any(len(c) != 1 for c in labels):
                    raise SystemExit("nocache variants score single-token labels only")
                fn = lambda: nocache_scores(lm, whole, [c[0] for c in labels])  # noqa: E731
            else:
                fn = lambda: lm.score_batch(tail, labels, engine.prefix)  # noqa: E731
            try:
                first, sec, out = time_it(fn, args.repeats, device)
            except Exception as e:  # a variant that cannot run here is reported, not fatal
                result["runs"].append({"variant": variant, "batch_size": B, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"{variant} B={B}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            scores = out.float().cpu()
            ref = next((r for r in result["runs"] if r["variant"] == "eager" and r["batch_size"] == B), None)
            run = {"variant": variant, "batch_size": B, "first_call_s": first, "seconds": sec,
                   "ms_per_query": 1e3 * sec / B, "queries_per_s": B / sec,
                   "tokens": int(sum(map(len, whole))), "tokens_per_s": sum(map(len, whole)) / sec,
                   "scores": scores.tolist()}
            if ref is not None:
                r = torch.tensor(ref["scores"])
                run["max_abs_diff_vs_eager"] = float((scores - r).abs().max())
                run["argmax_agree_vs_eager"] = float((scores.argmax(1) == r.argmax(1)).float().mean())
            result["runs"].append(run)
            print(f"{variant} B={B}: {run['ms_per_query']:.3f} ms/query ({run['queries_per_s']:.0f} q/s), "
                  f"first call {first:.1f} s" + (f", max |diff| {run['max_abs_diff_vs_eager']:.3g}, argmax agree "
                                                 f"{run['argmax_agree_vs_eager']:.1%}" if ref else ""), file=sys.stderr)
            if args.profile and variant == "eager" and B == max(args.batch_sizes):
                result["profile"] = profile_table(fn, device)
                print(result["profile"], file=sys.stderr)
    for r in result["runs"]:
        r.pop("scores", None)
    publish(Path(args.out), "gpu_lm_probe", result, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = ["# LM time of one scoring batch, by variant", "", f"`{r['command']}` on {r['device']}, torch {r['torch']}", "",
             "| variant | batch | ms/query | queries/s | tokens/s | first call s | max abs diff vs eager | argmax = eager |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        if "error" in x:
            lines.append(f"| {x['variant']} | {x['batch_size']} | {x['error'][:80]} | | | | | |")
            continue
        d = x.get("max_abs_diff_vs_eager")
        a = x.get("argmax_agree_vs_eager")
        lines.append(f"| {x['variant']} | {x['batch_size']} | {x['ms_per_query']:.3f} | {x['queries_per_s']:.0f} | "
                     f"{x['tokens_per_s']:.3g} | {x['first_call_s']:.1f} | {'–' if d is None else f'{d:.3g}'} | "
                     f"{'–' if a is None else f'{a:.1%}'} |")
    if r.get("profile"):
        lines += ["", "Eager batch, torch.profiler (largest batch):", "", "```", r["profile"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
