"""Padding the LM runs over, by LM batch size and queries per engine call.

    .venv/bin/python benchmarks/padding_bench.py                   # writes results/padding_bench.{json,md}

The engine left-pads each LM batch to its longest prompt, and `score.length_batches` cuts the
batches from the queries of one engine call sorted by length: the more LM batches' worth of
queries a call holds, the closer the lengths in each batch. This counts it exactly, without an
LM: the real prompts (SmolLM2 tokenizer, built-in sentiment template with its cached prefix,
kNN at k over the Rotten Tomatoes train pool) of the test queries, cycled to --n as the GPU
benchmark does, batched as `evaluate(chunk=...)` batches them. Padding = padded positions /
real positions - 1, over the positions the LM runs (after the shared prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icl_engine.core.data import load_dataset  # noqa: E402
from icl_engine.core.embed import get_embedder  # noqa: E402
from icl_engine.core.evaluate import CHUNK_BATCHES, MIN_CHUNK  # noqa: E402
from icl_engine.core.index import ExampleIndex  # noqa: E402
from icl_engine.core.lm import cache_root  # noqa: E402
from icl_engine.core.pipeline import Engine, PipelineConfig  # noqa: E402
from icl_engine.core.registry import SENTIMENT_TEMPLATE  # noqa: E402
from icl_engine.core.score import MAX_PADDING, length_batches  # noqa: E402

DATA = Path(os.environ.get("ICL_SHARED_DATA") or ROOT.parent / "shared" / "data")


def prompt_lengths(n: int, k: int, embedder: str, tokenizer: str) -> np.ndarray:
    """Tokens the LM runs for each of the first n test queries (cycled): int64 [n]."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from overhead_bench import tiny_lm  # the real tokenizer; the LM itself is never called here

    pool = load_dataset(str(DATA / "rotten_tomatoes_train.jsonl"))
    test = load_dataset(str(DATA / "rotten_tomatoes_test.jsonl"))
    texts = [test.records[i % len(test)].input for i in range(n)]
    emb = get_embedder(embedder)
    engine = Engine.from_parts(PipelineConfig(index="rt", method="knn", k=k), ExampleIndex.build(pool, emb), emb,
                               tiny_lm(tokenizer), SENTIMENT_TEMPLATE)
    out = []
    for a in range(0, n, 1024):
        out += [len(p.ids) - p.shared_len for p in engine.prepare(texts[a : a + 1024]).prompts]
    return np.asarray(out, np.int64)


def padding(lengths: np.ndarray, batch: int, chunk: int, cap: float = MAX_PADDING) -> tuple[float, float]:
    """(padded / real positions - 1, mean rows per LM forward) when evaluate hands the engine
    `chunk` queries a call and a bucket ends where its padding would pass `cap`."""
    padded = forwards = 0
    for a in range(0, len(lengths), chunk):
        part = lengths[a : a + chunk]
        rows = [range(int(x)) for x in part]  # length_batches reads only len() of each row
        batches = length_batches(rows, batch, True, cap)
        padded += sum(len(idx) * int(part[idx].max()) for idx in batches)
        forwards += len(batches)
    return padded / int(lengths.sum()) - 1, len(lengths) / forwards


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4264, help="test queries, cycled past the 1,066 (the GPU runs' 4,264)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--embedder", default="hashing:384")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 256, 512, 1024, 2048])
    p.add_argument("--chunk-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--tokenizer", default=str(cache_root() / "models" / "smollm2-135m-instruct"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    lengths = prompt_lengths(args.n, args.k, args.embedder, args.tokenizer)
    tables = {cap: {b: {c: padding(lengths, b, b * c, cap) for c in args.chunk_batches} for b in args.batch_sizes}
              for cap in (MAX_PADDING, float("inf"))}
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["benchmarks/padding_bench.py", *(argv if argv is not None else sys.argv[1:])]),
              "config": {"n": args.n, "k": args.k, "embedder": args.embedder},
              "lm_positions": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max()),
                               "p10": float(np.percentile(lengths, 10)), "p90": float(np.percentile(lengths, 90))},
              "max_padding": MAX_PADDING,
              # by batch size, then call size in batches: (padding, mean rows per forward)
              "padding": {str(b): {str(c): v for c, v in row.items()} for b, row in tables[MAX_PADDING].items()},
              "padding_uncapped": {str(b): {str(c): v for c, v in row.items()}
                                   for b, row in tables[float("inf")].items()}}
    lp = result["lm_positions"]
    md = ["# Padding by LM batch and queries per engine call", "", f"`{result['command']}`, {result['created']}", "",
          f"n = {args.n} Rotten Tomatoes test queries (cycled), kNN k = {args.k} ({args.embedder}), SmolLM2 "
          f"tokenizer, built-in sentiment template (its shared prefix cached, not counted). Positions the LM runs "
          f"a query: mean {lp['mean']:.1f}, 10th-90th percentile {lp['p10']:.0f}-{lp['p90']:.0f}, "
          f"range {lp['min']}-{lp['max']}.", "",
          "Padding = padded positions / real positions - 1, by LM batch (rows) and engine call size in LM "
          f"batches (columns; `evaluate`'s default is CHUNK_BATCHES = {CHUNK_BATCHES}, at least {MIN_CHUNK} "
          f"queries). Each cell: padding, then the mean rows per LM forward. Buckets end where padding would "
          f"pass MAX_PADDING = {MAX_PADDING:.1%} of a batch's positions (`score.length_batches`); the second "
          "table cuts by size alone.", ""]
    for cap, title in ((MAX_PADDING, "With the padding cap (the engine)"), (float("inf"), "By size alone")):
        md += [f"{title}:", "",
               "| LM batch | " + " | ".join(f"{c} batch{'es' if c > 1 else ''}" for c in args.chunk_batches) + " |",
               "|---|" + "---|" * len(args.chunk_batches)]
        md += [f"| {b} | " + " | ".join(f"{row[c][0]:.1%}, {row[c][1]:.1f}" for c in args.chunk_batches) + " |"
               for b, row in tables[cap].items()] + [""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "padding_bench.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    (out / "padding_bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
