"""Scale benchmark: Ray embedding against the plain build, add-100 against a rebuild,
and flat against IVF-PQ on disk. Each part is measured in one run, interleaved where it compares.

    .venv/bin/python benchmarks/scale_bench.py                         # all parts, full sizes
    .venv/bin/python benchmarks/scale_bench.py --parts embed --n 3000  # a quick look
    .venv/bin/python benchmarks/scale_bench.py --parts ondisk --synthetic 200000

embed   the Rotten Tomatoes train reviews (rotten_tomatoes:train, 11,752) with MiniLM, embedding
        cache off: the plain Embedder (one process, all cores) against ray_jobs.embed_texts with 1
        and 2 actors on a local Ray (start-up excluded: Ray is started once before timing); texts/s,
        ratio to plain, and the largest difference between Ray's and the plain vectors.
add     the 11,752-review index (built from the warm embedding cache), then `update_index` of 100
        new reviews (rotten_tomatoes:test, cache off: really embedded) against a rebuild (the plain
        embedding time of all 11,852 texts, measured here); the index is checked after the add.
ondisk  a synthetic N x 384 set (unit-norm; --data isotropic|lowrank): flat (exact) against
        IVF-PQ with on-disk lists (ondisk.py), with and without an exact re-rank of 64 PQ
        candidates: build time, bytes in RAM / on disk, query time (100 queries, one at a time
        and batched), recall@8 against flat.
Writes benchmarks/results/scale/scale_bench.json and .md (command, machine, load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icl_engine.core.choices import DEFAULT_EMBEDDER
from icl_engine.core.data import load_dataset  # noqa: E402
from icl_engine.core.embed import Embedder  # noqa: E402
from icl_engine.core.index import ExampleIndex, update_index  # noqa: E402
from icl_engine.core.index.ondisk import (  # noqa: E402
    OnDiskConfig,
    build_ondisk,
    open_ondisk,
    open_vectors,
    recall_at_k,
    search_reranked,
)

OUT = ROOT / "benchmarks" / "results" / "scale"


def machine() -> dict:
    import faiss
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
            "cuda": torch.cuda.is_available(), "load_average_at_start": list(os.getloadavg())}


def plain_embed(texts: list[str]) -> tuple[float, np.ndarray]:
    emb = Embedder(DEFAULT_EMBEDDER, cache_dir=False).load()
    t = time.perf_counter()
    vecs = emb.encode(texts, show_progress=False)
    return time.perf_counter() - t, vecs


def part_embed(n: int | None) -> dict:
    from icl_engine.apps.ray_jobs import RayOptions, embed_texts, init_ray

    texts = [r.input for r in load_dataset("rotten_tomatoes:train").records][:n]
    init_ray(RayOptions(workers=2))  # start Ray once, outside the timings
    runs = []
    for label, workers in (("plain", None), ("ray-1", 1), ("ray-2", 2), ("plain", None)):  # plain twice: drift
        load = os.getloadavg()[0]
        if workers is None:
            seconds, vecs = plain_embed(texts)
        else:
            t = time.perf_counter()
            vecs = embed_texts(texts, DEFAULT_EMBEDDER, RayOptions(workers=workers, embedding_cache=False))
            seconds = time.perf_counter() - t
        runs.append({"run": label, "workers": workers, "seconds": round(seconds, 2),
                     "texts_per_s": round(len(texts) / seconds, 1), "load_1min": load, "vectors": vecs})
        print(f"embed {label}: {seconds:.1f} s, {len(texts) / seconds:.0f} texts/s (load {load:.1f})", flush=True)
    base = np.mean([r["seconds"] for r in runs if r["workers"] is None])
    ref = runs[0]["vectors"]
    for r in runs:
        r["ratio_to_plain"] = round(base / r["seconds"], 3)
        r["max_abs_diff_to_plain"] = float(np.abs(r.pop("vectors") - ref).max())
    return {"texts": len(texts), "runs": runs, "note": "ray runs include actor start-up (model load) per pool"}


def part_add(tmp: Path) -> dict:
    train = load_dataset("rotten_tomatoes:train")
    new = load_dataset("rotten_tomatoes:test").select(range(100))
    folder = tmp / "rt"
    ExampleIndex.build(train, Embedder(DEFAULT_EMBEDDER).load()).save(folder)  # from the warm cache
    cold = Embedder(DEFAULT_EMBEDDER, cache_dir=False).load()
    t = time.perf_counter()
    r = update_index(folder, records=new.records, embed=lambda texts: cold.encode(texts, show_progress=False))
    add_s = time.perf_counter() - t
    index = ExampleIndex.load(folder)
    assert len(index) == len(train) + 100 and r["added"] == 100
    t = time.perf_counter()
    cold.encode([x.input for x in new.records], show_progress=False)
    embed100_s = time.perf_counter() - t
    rebuild_s, _ = plain_embed([x.input for x in index.records])  # what a rebuild embeds (cache off)
    print(f"add 100: {add_s:.2f} s (embedding them alone {embed100_s:.2f} s); rebuild {rebuild_s:.1f} s", flush=True)
    return {"index_records": len(train), "added": 100, "add_seconds": round(add_s, 3),
            "embed_100_seconds": round(embed100_s, 3), "rebuild_embed_seconds": round(rebuild_s, 2),
            "rebuild_over_add": round(rebuild_s / add_s, 1), "load_1min": os.getloadavg()[0]}


def synthetic(n: int, d: int, seed: int, kind: str, centers: int = 1024) -> np.ndarray:
    """Unit-norm [n, d]. isotropic: 1,024 centres + isotropic noise in all d dimensions (the
    worst case for ANN: within a cluster every point is about as far as every other);
    lowrank: the same mixture in a 32-d latent space mapped linearly to d, plus 5 % noise
    (sentence embeddings have a low intrinsic dimension, so neighbours are well separated)."""
    rng = np.random.default_rng(0)  # the same centres and map for the data and the queries
    latent = d if kind == "isotropic" else 32
    c = rng.normal(size=(centers, latent)).astype(np.float32)
    proj = None if kind == "isotropic" else rng.normal(size=(latent, d)).astype(np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # in chunks: no n x d float64 temporaries
        m = min(n, s + 100_000) - s
        z = c[rng.integers(0, centers, m)] + 0.5 * rng.normal(size=(m, latent)).astype(np.float32)
        x = z if proj is None else z @ proj + 0.05 * rng.normal(size=(m, d)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out  # [n, d]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part_ondisk(n: int, tmp: Path, nlist: int, m: int, nprobe: int, data: str) -> dict:
    import faiss

    d, k = 384, 8
    x = synthetic(n, d, 1, data)
    q = synthetic(100, d, 2, data)
    flat = faiss.IndexFlatIP(d)
    t = time.perf_counter()
    flat.add(x)
    flat_build = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(len(q)):
        flat.search(q[i:i + 1], k)
    flat_one = (time.perf_counter() - t) / len(q)
    t = time.perf_counter()
    _, exact = flat.search(q, k)
    flat_batch = time.perf_counter() - t
    cfg = OnDiskConfig(nlist=nlist, m=m, nprobe=nprobe)
    train = x[np.random.default_rng(2).choice(n, min(n, 39 * nlist), replace=False)]
    t = time.perf_counter()
    path = build_ondisk(np.array_split(x, max(1, n // 250_000)), dim=d, folder=tmp / "ivfpq", config=cfg, train=train)
    build = time.perf_counter() - t
    del flat, x
    index = open_ondisk(path, nprobe=nprobe)
    ram = faiss.serialize_index(faiss.read_index(str(tmp / "ivfpq" / "trained.index"))).nbytes  # cells + codebooks
    t = time.perf_counter()
    for i in range(len(q)):
        index.search(q[i:i + 1], k)
    one = (time.perf_counter() - t) / len(q)
    t = time.perf_counter()
    _, found = index.search(q, k)
    batch = time.perf_counter() - t
    vectors = open_vectors(tmp / "ivfpq", d)
    t = time.perf_counter()
    for i in range(len(q)):
        search_reranked(index, vectors, q[i:i + 1], k)
    rr_one = (time.perf_counter() - t) / len(q)
    _, reranked = search_reranked(index, vectors, q, k)
    result = {"n": n, "dim": d, "k": k, "queries": len(q), "data": data,
              "flat": {"ram_bytes": n * d * 4, "build_s": round(flat_build, 2), "query_ms_one": round(flat_one * 1e3, 2),
                       "query_s_batch_100": round(flat_batch, 3), "recall_at_8": 1.0},
              "ivfpq_ondisk": {"nlist": nlist, "m": m, "nbits": 8, "nprobe": nprobe, "train_vectors": len(train),
                               "build_s": round(build, 1), "ram_bytes_cells_codebooks": ram,
                               "disk_bytes_lists": (tmp / "ivfpq" / "lists.ivfdata").stat().st_size,
                               "query_ms_one": round(one * 1e3, 2), "query_s_batch_100": round(batch, 3),
                               "recall_at_8": round(recall_at_k(found, exact), 4),
                               "reranked_x8": {"query_ms_one": round(rr_one * 1e3, 2),
                                               "recall_at_8": round(recall_at_k(reranked, exact), 4),
                                               "disk_bytes_vectors": n * d * 4}},
              "process_peak_rss_mb": round(rss_mb()), "load_1min": os.getloadavg()[0]}
    print(json.dumps(result, indent=1), flush=True)
    return result


def markdown(report: dict) -> str:
    lines = [f"# Scale benchmark ({report['date']})", "", f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, load average at start "
             f"{report['machine']['load_average_at_start']} (shared with other jobs: compare ratios within a part).", ""]
    if "embed" in report:
        e = report["embed"]
        lines += [f"## Embedding {e['texts']} Rotten Tomatoes reviews (MiniLM, cache off)", "",
                  "| run | workers | seconds | texts/s | ratio to plain | max abs diff to plain | load (1 min) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['workers'] or '-'} | {r['seconds']} | {r['texts_per_s']} | {r['ratio_to_plain']} | "
                  f"{r['max_abs_diff_to_plain']:.1e} | {r['load_1min']:.1f} |" for r in e["runs"]]
        lines += ["", e["note"], ""]
    if "add" in report:
        a = report["add"]
        lines += ["## Add 100 records against a rebuild", "",
                  f"Index of {a['index_records']} reviews; `update_index` of 100 new ones: {a['add_seconds']} s "
                  f"(embedding the 100 alone: {a['embed_100_seconds']} s). A rebuild embeds all "
                  f"{a['index_records'] + 100}: {a['rebuild_embed_seconds']} s, {a['rebuild_over_add']}x the add "
                  f"(load {a['load_1min']:.1f}).", ""]
    if "ondisk" in report:
        o = report["ondisk"]
        f, v = o["flat"], o["ivfpq_ondisk"]
        lines += [f"## Flat against IVF-PQ on disk: synthetic {o['n']:,} x {o['dim']} ({o.get('data', 'isotropic')})", "",
                  "| index | build s | RAM (MB) | disk (MB) | ms / query (one at a time) | s / 100 queries (batch) | recall@8 |",
                  "|---|---|---|---|---|---|---|",
                  f"| flat | {f['build_s']} | {f['ram_bytes'] / 1e6:.0f} | - | {f['query_ms_one']} | {f['query_s_batch_100']} | 1.0 |",
                  f"| IVF-PQ on disk (nlist {v['nlist']}, m {v['m']}, nprobe {v['nprobe']}) | {v['build_s']} | "
                  f"{v['ram_bytes_cells_codebooks'] / 1e6:.1f} | {v['disk_bytes_lists'] / 1e6:.0f} | {v['query_ms_one']} | "
                  f"{v['query_s_batch_100']} | {v['recall_at_8']} |"]
        if "reranked_x8" in v:
            r = v["reranked_x8"]
            lines.append(f"| + exact re-rank of 64 candidates (raw vectors mmapped) | - | - | "
                         f"+{r['disk_bytes_vectors'] / 1e6:.0f} | {r['query_ms_one']} | - | {r['recall_at_8']} |")
        lines += ["",
                  f"IVF-PQ trained on {v['train_vectors']:,} sampled vectors; RAM is the cells and codebooks (the "
                  f"lists are mmapped from disk). Load {o['load_1min']:.1f}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="embed,add,ondisk")
    ap.add_argument("--n", type=int, default=None, help="embed: first N reviews (default all 11,752)")
    ap.add_argument("--synthetic", type=int, default=1_000_000, help="ondisk: N synthetic vectors")
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--m", type=int, default=48)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--data", choices=["isotropic", "lowrank"], default="isotropic", help="ondisk: synthetic set")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    parts = args.parts.split(",")
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/scale_bench.py " + " ".join(sys.argv[1:]), "machine": machine()}
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    try:
        if "embed" in parts:
            report["embed"] = part_embed(args.n)
        if "add" in parts:
            report["add"] = part_add(tmp)
        if "ondisk" in parts:
            report["ondisk"] = part_ondisk(args.synthetic, tmp, args.nlist, args.m, args.nprobe, args.data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"scale_bench{args.tag}"
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
