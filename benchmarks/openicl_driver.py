"""Peer side of the benchmark: OpenICL 0.1.8 (TopkRetriever + PPLInferencer), offline, on CPU.

Runs inside the separate venv made by `benchmarks/openicl_env.sh`, as a subprocess of the main
benchmark; it never imports icl_engine. It drives OpenICL through its public API only
(DatasetReader, PromptTemplate, TopkRetriever / ZeroRetriever, PPLInferencer) and writes one JSON
object with accuracy, timings (wall and process CPU seconds), LM tokens processed, predictions and
the exact prompt texts. With --serve it sets up once and then scores blocks of the test rows on
request, so the main benchmark can alternate blocks of engine and peer; every block's retriever
after the first reuses the pool's index (a TopkRetriever whose create_index returns it).

    benchmarks/.openicl-venv/bin/python benchmarks/openicl_driver.py \
        --model DIR --embedder DIR --train FILE --test FILE --n 200 --k 8 --out out.json

What OpenICL does with the template below (read from its source, openicl 0.1.8):
- demonstrations: nearest first (faiss returns neighbours by decreasing similarity and
  `generate_ice` joins them in that order), joined by `ice_separator`, followed by
  `ice_eos_token`; both are "\n\n" here, so the query follows the last demo after "\n\n".
- one full prompt per label (demos + query + " label"), tokenized in one piece, no BOS (the
  SmolLM2 tokenizer adds none); right padding with pad = eos.
- score: mean token cross-entropy over the WHOLE sequence (demos, query and label), i.e.
  sum of -log p(t_i | t_<i) for i = 1..T-1 divided by T (the first token has no loss but is
  counted); prediction = label with the lowest score.
"""

from __future__ import annotations

import os

# Before torch/transformers are imported: no GPU (OpenICL moves to "cuda" whenever it sees
# one), no hub look-ups (the model hubs are unreachable here), no tokenizer fork warnings.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

__all__ = ["main"]

# The template the engine uses too: a demonstration is INPUT_FORMAT + verbalizer, the query is
# INPUT_FORMAT and each label's continuation is its verbalizer; SEPARATOR between parts. The
# verbalizers come from the data: each label itself (--verbalizers maps others).
INPUT_FORMAT = "Review: {text}\nSentiment: "
SEPARATOR = "\n\n"
ICE_TOKEN = "</E>"  # OpenICL placeholder tokens; neither occurs in the data
TEXT_TOKEN = "</text>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face folder of the causal LM")
    p.add_argument("--embedder", required=True, help="local sentence-transformers folder (MiniLM)")
    p.add_argument("--train", required=True, help="JSONL with text,label: the demonstration pool")
    p.add_argument("--test", required=True, help="JSONL with text,label: the queries")
    p.add_argument("--n", type=int, default=200, help="use the first N test rows")
    p.add_argument("--k", type=int, default=8, help="demonstrations per query (0: ZeroRetriever)")
    p.add_argument("--batch-size", type=int, default=8, help="PPLInferencer batch size")
    p.add_argument("--embed-batch-size", type=int, default=64, help="TopkRetriever batch size")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=None, help="where to write the result JSON (not with --serve)")
    p.add_argument("--verbalizers", default=None,
                   help='JSON object label -> word shown, for labels that are not words (default: each label itself)')
    p.add_argument("--serve", action="store_true",
                   help="set up once, then score blocks of test rows asked for on stdin (see main)")
    a = p.parse_args(argv)
    if not a.serve and not a.out:
        p.error("--out is required (unless --serve)")
    for name in ("n", "batch_size", "embed_batch_size", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.k < 0:
        p.error("--k must be >= 0")
    return a


def read_jsonl(path: str, n: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append({"text": str(r["text"]), "label": str(r["label"])})
            if n is not None and len(rows) >= n:
                break
    return rows


def install_shims() -> None:
    """The two shims OpenICL 0.1.8 needs on transformers 5; both only touch TopkRetriever's
    embedding data path (tokenize -> pad -> decode -> SentenceTransformer.encode), never the
    prompts, the LM or the scores.

    1. openicl.icl_dataset_reader.DatasetEncoder calls `tokenizer.encode_plus(text,
       truncation=True, return_tensors='pt', verbose=False)`; transformers 5 removed
       `encode_plus`, whose behaviour for one text is exactly `__call__`.
    2. openicl.utils.collators.DataCollatorWithPaddingAndCuda keeps each batch's metadata in a
       `ListWrapper` whose `.to(device)` takes no keywords; transformers 5's
       `BatchEncoding.to` calls `v.to(device=..., non_blocking=...)` on every value.
    """
    from transformers import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "encode_plus"):
        PreTrainedTokenizerBase.encode_plus = PreTrainedTokenizerBase.__call__

    from openicl.utils.collators import ListWrapper

    ListWrapper.to = lambda self, device=None, **kwargs: self.data


class TokenCounter:
    """Counts what the LM is fed: a forward pre-hook sees every batch PPLInferencer runs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.sequences = 0
        self.tokens = 0  # real tokens (attention mask 1)
        self.padded_tokens = 0  # tokens incl. right padding, as computed by the model

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)  # [B, T]
        mask = kwargs.get("attention_mask")  # [B, T]
        self.calls += 1
        self.sequences += int(ids.shape[0])
        self.padded_tokens += int(ids.numel())
        self.tokens += int(mask.sum()) if mask is not None else int(ids.numel())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag in ("model", "embedder", "train", "test"):
        if not Path(getattr(args, flag)).exists():
            print(f"error: --{flag} {getattr(args, flag)} does not exist", file=sys.stderr)
            return 1
    try:
        peer = Peer(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if not args.serve:
            write_json(args.out, peer.result(peer.run_block(0, len(peer.test))))
            return 0
        serve(peer)
    finally:
        shutil.rmtree(peer.out_dir, ignore_errors=True)
    return 0


def serve(peer: "Peer") -> None:
    # Serve blocks: one request a line on stdin, "START STOP OUT" (test rows [START, STOP), the
    # result JSON written to OUT), answered by a line READY / DONE on stdout once written.
    print(READY, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        start, stop, out = line.split(maxsplit=2)
        write_json(out.strip(), peer.result(peer.run_block(int(start), int(stop))))
        print(DONE, flush=True)


READY, DONE = "@@openicl-driver ready", "@@openicl-driver done"


def write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


class Peer:
    """OpenICL set up once (LM loaded, the pool embedded and indexed); `run_block` then retrieves
    for and scores a block of the test rows, timed (wall and process CPU seconds)."""

    def __init__(self, args: argparse.Namespace):
        import torch

        torch.set_num_threads(args.threads)
        install_shims()
        from openicl import PPLInferencer, PromptTemplate
        from sentence_transformers import SentenceTransformer

        self.args = args
        self.train, self.test = read_jsonl(args.train), read_jsonl(args.test, args.n)
        self.labels = sorted({r["label"] for r in self.train} | {r["label"] for r in self.test})
        # verbalizers: the labels themselves unless --verbalizers maps some of them to other words
        self.verbalizers = {lab: lab for lab in self.labels} | json.loads(args.verbalizers or "{}")
        unknown = sorted(set(self.verbalizers) - set(self.labels))
        if unknown:
            raise ValueError(f"--verbalizers names labels not in the data: {unknown}")
        # One dict template keyed by label, used for the demos (ICE_TOKEN dropped) and for the
        # per-label prompts (ICE_TOKEN replaced by the joined demos).
        self.template = PromptTemplate(
            {lab: ICE_TOKEN + INPUT_FORMAT.format(text=TEXT_TOKEN) + self.verbalizers[lab] for lab in self.labels},
            column_token_map={"text": TEXT_TOKEN},
            ice_token=ICE_TOKEN,
        )
        # LM load (timed apart). model_name is the local folder, loaded by OpenICL itself.
        self.out_dir = tempfile.mkdtemp(prefix="openicl-out-")
        t0 = time.perf_counter()
        self.inferencer = PPLInferencer(model_name=args.model, batch_size=args.batch_size,
                                        output_json_filepath=self.out_dir)
        self.lm_load_s = time.perf_counter() - t0
        self.counter = TokenCounter()
        self.inferencer.model.register_forward_pre_hook(self.counter, with_kwargs=True)
        # The embedder is loaded inside TopkRetriever's constructor; load it once here first to
        # time it on its own (the second load, inside the constructor, is then warm).
        self.embedder_load_s = 0.0
        self.base = None
        t0 = time.perf_counter()
        if args.k > 0:
            SentenceTransformer(args.embedder, device="cpu")
            self.embedder_load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.base = self.retriever(self.test)  # embeds and indexes the pool: once
        self.index_build_s = time.perf_counter() - t0

    def retriever(self, rows: list[dict]):
        """A retriever over the pool for the test rows `rows`; after the first, the pool's index
        is reused (TopkRetriever.create_index returns the first one's), not embedded again."""
        from datasets import Dataset, DatasetDict
        from openicl import DatasetReader, TopkRetriever, ZeroRetriever

        # In memory, no hub: a DatasetDict with the splits TopkRetriever expects by default.
        data = DatasetDict({"train": Dataset.from_list(self.train), "test": Dataset.from_list(rows)})
        reader = DatasetReader(data, input_columns=["text"], output_column="label")
        if self.args.k == 0:
            return ZeroRetriever(reader, ice_eos_token="")
        base = self.base

        class Retriever(TopkRetriever):
            def create_index(self):
                if base is None:
                    return super().create_index()
                self.embed_list = base.embed_list
                return base.index

        # tokenizer_name: OpenICL tokenizes, decodes and re-embeds every text; the LM's
        # byte-level BPE tokenizer round-trips the texts exactly (checked on the whole pool).
        return Retriever(reader, ice_separator=SEPARATOR, ice_eos_token=SEPARATOR, ice_num=self.args.k,
                         sentence_transformers_model_name=self.args.embedder, tokenizer_name=self.args.model,
                         batch_size=self.args.embed_batch_size)

    def run_block(self, start: int, stop: int) -> dict:
        """Retrieval for test rows [start, stop) (embedding them + faiss search) and PPL scoring."""
        rows = self.test[start:stop]
        retriever = self.retriever(rows)  # set-up, not timed (the first block's is the pool's index)
        self.counter.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        predictions = self.inferencer.inference(retriever, ice_template=self.template)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        with open(os.path.join(self.out_dir, "predictions.json"), encoding="utf-8") as f:
            detail = json.load(f)
        # Retrieved train-row ids, recomputed after the timed run (deterministic; not timed).
        ice_ids = [list(map(int, ids)) for ids in retriever.retrieve()] if self.args.k > 0 else [[] for _ in rows]
        n = len(rows)
        return {"start": start, "stop": stop, "n": n, "seconds": seconds, "cpu_seconds": cpu,
                "predictions": predictions, "gold": [r["label"] for r in rows],
                "lm_forward_calls": self.counter.calls, "lm_sequences": self.counter.sequences,
                "lm_tokens": self.counter.tokens, "lm_padded_tokens": self.counter.padded_tokens,
                # mean token loss per label, as PPLInferencer computed it (lower wins)
                "ppl": [[detail[str(i)][f"label: {lab}"]["PPL"] for lab in self.labels] for i in range(n)],
                "ice_ids": ice_ids,
                "prompts": [{lab: detail[str(i)][f"label: {lab}"]["prompt"] for lab in self.labels}
                            for i in range(min(2, n))]}

    def result(self, block: dict) -> dict:
        """One block's result with the run's settings, totals and versions."""
        args, n, seconds = self.args, block["n"], block["seconds"]
        accuracy = sum(p == g for p, g in zip(block["predictions"], block["gold"])) / n
        print(f"openicl k={args.k} rows {block['start']}-{block['stop']}: accuracy {accuracy:.3f}, "
              f"{n / seconds:.2f} queries/s, {block['lm_tokens'] / n:.0f} LM tokens/query", file=sys.stderr)
        return {
            "peer": "openicl==0.1.8", "retriever": "TopkRetriever" if args.k > 0 else "ZeroRetriever",
            "inferencer": "PPLInferencer", "model": str(args.model),
            "embedder": str(args.embedder) if args.k > 0 else None, "k": args.k, "batch_size": args.batch_size,
            "threads": args.threads, **block, "accuracy": accuracy,
            "queries_per_s": n / seconds,  # query retrieval + inference, models loaded and index built
            "cpu_seconds_per_query": block["cpu_seconds"] / n,
            "lm_load_s": self.lm_load_s, "embedder_load_s": self.embedder_load_s,
            "index_build_s": self.index_build_s,  # embed + index the pool (incl. a warm embedder load)
            "seconds_incl_index": seconds + self.index_build_s, "index_size": len(self.train),
            "tokens_per_query": block["lm_tokens"] / n, "padded_tokens_per_query": block["lm_padded_tokens"] / n,
            "labels": self.labels,
            "template": {"input_format": INPUT_FORMAT, "verbalizers": self.verbalizers, "separator": SEPARATOR},
            "versions": versions(),
        }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["openicl", "torch", "transformers", "tokenizers", "sentence-transformers",
             "faiss-cpu", "datasets", "accelerate", "numpy"]
    return {name: version(name) for name in names}


if __name__ == "__main__":
    sys.exit(main())
