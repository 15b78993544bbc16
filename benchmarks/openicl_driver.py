"""Peer side of the benchmark: OpenICL 0.1.8 (TopkRetriever + PPLInferencer), offline, on CPU.

Runs inside the separate venv made by `benchmarks/openicl_env.sh`, as a subprocess of the main
benchmark; it never imports icl_engine. It drives OpenICL through its public API only
(DatasetReader, PromptTemplate, TopkRetriever / ZeroRetriever, PPLInferencer) and writes one JSON
object with accuracy, timings, LM tokens processed, predictions and the exact prompt texts.

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
# INPUT_FORMAT and each label's continuation is its verbalizer; SEPARATOR between parts.
INPUT_FORMAT = "Review: {text}\nSentiment: "
VERBALIZERS = {"negative": "negative", "positive": "positive"}
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
    p.add_argument("--out", required=True, help="where to write the result JSON")
    a = p.parse_args(argv)
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

    import torch

    torch.set_num_threads(args.threads)
    install_shims()
    from datasets import Dataset, DatasetDict
    from openicl import DatasetReader, PPLInferencer, PromptTemplate, TopkRetriever, ZeroRetriever
    from sentence_transformers import SentenceTransformer

    train, test = read_jsonl(args.train), read_jsonl(args.test, args.n)
    labels = sorted({r["label"] for r in train} | {r["label"] for r in test})
    unknown = [lab for lab in labels if lab not in VERBALIZERS]
    if unknown:
        print(f"error: labels without a verbalizer: {unknown}", file=sys.stderr)
        return 1

    # In memory, no hub: a DatasetDict with the splits TopkRetriever expects by default.
    data = DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})
    reader = DatasetReader(data, input_columns=["text"], output_column="label")
    # One dict template keyed by label, used for the demos (ICE_TOKEN dropped) and for the
    # per-label prompts (ICE_TOKEN replaced by the joined demos).
    template = PromptTemplate(
        {lab: ICE_TOKEN + INPUT_FORMAT.format(text=TEXT_TOKEN) + VERBALIZERS[lab] for lab in labels},
        column_token_map={"text": TEXT_TOKEN},
        ice_token=ICE_TOKEN,
    )

    # LM load (timed apart). model_name is the local folder, loaded by OpenICL itself.
    out_dir = tempfile.mkdtemp(prefix="openicl-out-")
    t0 = time.perf_counter()
    inferencer = PPLInferencer(
        model_name=args.model, batch_size=args.batch_size, output_json_filepath=out_dir
    )
    lm_load_s = time.perf_counter() - t0
    counter = TokenCounter()
    inferencer.model.register_forward_pre_hook(counter, with_kwargs=True)

    # The embedder is loaded inside TopkRetriever's constructor; load it once here first to
    # time it on its own (the second load, inside the constructor, is then warm).
    embedder_load_s = 0.0
    t0 = time.perf_counter()
    if args.k > 0:
        SentenceTransformer(args.embedder, device="cpu")
        embedder_load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # tokenizer_name: OpenICL tokenizes, decodes and re-embeds every text; the LM's
        # byte-level BPE tokenizer round-trips the texts exactly (checked on the whole pool).
        retriever = TopkRetriever(
            reader,
            ice_separator=SEPARATOR,
            ice_eos_token=SEPARATOR,
            ice_num=args.k,
            sentence_transformers_model_name=args.embedder,
            tokenizer_name=args.model,
            batch_size=args.embed_batch_size,
        )
    else:
        retriever = ZeroRetriever(reader, ice_eos_token="")
    index_build_s = time.perf_counter() - t0

    # Retrieval for the queries (embedding them + faiss search) and PPL scoring.
    t0 = time.perf_counter()
    predictions = inferencer.inference(retriever, ice_template=template)
    seconds = time.perf_counter() - t0

    with open(os.path.join(out_dir, "predictions.json"), encoding="utf-8") as f:
        detail = json.load(f)
    shutil.rmtree(out_dir, ignore_errors=True)
    # Retrieved train-row ids, recomputed after the timed run (deterministic; not timed).
    ice_ids = [list(map(int, ids)) for ids in retriever.retrieve()]

    gold = [r["label"] for r in test]
    n = len(test)
    accuracy = sum(p == g for p, g in zip(predictions, gold)) / n
    result = {
        "peer": "openicl==0.1.8",
        "retriever": "TopkRetriever" if args.k > 0 else "ZeroRetriever",
        "inferencer": "PPLInferencer",
        "model": str(args.model),
        "embedder": str(args.embedder) if args.k > 0 else None,
        "n": n,
        "k": args.k,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "accuracy": accuracy,
        "seconds": seconds,  # query retrieval + inference, models loaded and index built
        "queries_per_s": n / seconds,
        "lm_load_s": lm_load_s,
        "embedder_load_s": embedder_load_s,
        "index_build_s": index_build_s,  # embed + index the train pool (incl. a warm embedder load)
        "seconds_incl_index": seconds + index_build_s,
        "index_size": len(train),
        "lm_forward_calls": counter.calls,
        "lm_sequences": counter.sequences,
        "lm_tokens": counter.tokens,
        "lm_padded_tokens": counter.padded_tokens,
        "tokens_per_query": counter.tokens / n,
        "padded_tokens_per_query": counter.padded_tokens / n,
        "labels": labels,
        "template": {
            "input_format": INPUT_FORMAT,
            "verbalizers": VERBALIZERS,
            "separator": SEPARATOR,
        },
        "predictions": predictions,
        "gold": gold,
        # mean token loss per label, as PPLInferencer computed it (lower wins)
        "ppl": [[detail[str(i)][f"label: {lab}"]["PPL"] for lab in labels] for i in range(n)],
        "ice_ids": ice_ids,
        "prompts": [
            {lab: detail[str(i)][f"label: {lab}"]["prompt"] for lab in labels}
            for i in range(min(2, n))
        ],
        "versions": versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(args.out) + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(args.out)
    print(
        f"openicl k={args.k} n={n}: accuracy {accuracy:.3f}, {n / seconds:.2f} queries/s, "
        f"{counter.tokens / n:.0f} LM tokens/query",
        file=sys.stderr,
    )
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["openicl", "torch", "transformers", "tokenizers", "sentence-transformers",
             "faiss-cpu", "datasets", "accelerate", "numpy"]
    return {name: version(name) for name in names}


if __name__ == "__main__":
    sys.exit(main())
