"""Shared test fixtures: tiny deterministic tokenizer and tiny random causal LMs (no downloads)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

# One torch thread per test process, and in the `icl` processes the tests start, unless the run
# asks for another count: the suite runs on pytest-xdist workers, one per core, and tiny models
# gain nothing from threads (load_lm reads these variables; the one_thread fixture below does the
# same for the test process itself).
if not any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ICL_NUM_THREADS")):
    os.environ["ICL_NUM_THREADS"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_CORPUS = [
    "the movie was great and the acting was wonderful",
    "a dull boring film with a terrible plot",
    "positive negative neutral review sentiment label answer",
    "name eatType area food priceRange near customer rating coffee shop pub restaurant",
    "play music add to playlist book restaurant get weather rate book",
    "Review: Sentiment: Input: Output: x = [0.3, -1.2] -> A B",
] * 4


PROGRESS_LINE = re.compile(r"\[\d\d:\d\d:\d\d\] ")  # progress.say's lines: long work says it is going on


def said(stderr: str) -> list[str]:
    """What a command said on stderr, its progress lines (which long work prints) left out."""
    return [ln for ln in stderr.strip().splitlines() if not PROGRESS_LINE.match(ln)]


def shared_data(name: str) -> Path:
    """Path of a file in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{name} (the shared data folder beside the checkout is absent)")
    return path


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained in memory on a small corpus: deterministic, fast, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def make_tiny_model(vocab_size: int, seed: int = 0, **overrides):
    """A tiny random Llama (the SmolLM2 architecture) built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


def make_tiny_lm(tokenizer, **overrides):
    """An `LM` over a tiny random Llama. initializer_range 0.2 (not the config's 0.02): at 0.02
    every next-token distribution is near uniform, so two buggy scorers would still agree and a
    soft prompt would have nothing to learn."""
    import torch

    from icl_engine.core.lm import LM

    overrides.setdefault("initializer_range", 0.2)
    return LM(make_tiny_model(len(tokenizer), **overrides), tokenizer, "tiny", torch.device("cpu"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared, busy machine thread hand-offs
    dominate their run time. (load_lm sets its own thread count for the real models.) The same
    for faiss's OpenMP threads: training a small IVF-PQ took 10-25 s with 2 threads on the loaded
    2-core machine against 1.2-1.4 s with one (their barriers spin while the other core is busy)."""
    import faiss
    import torch

    n, m = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(m)


# A tiny sentiment task shared by the soft-prompt, fine-tuning and report tests.
SENTIMENT_ROWS = [
    ("the movie was great", "positive"), ("wonderful acting and a great plot", "positive"),
    ("great film", "positive"), ("the acting was wonderful", "positive"), ("a wonderful movie", "positive"),
    ("a dull boring film", "negative"), ("terrible plot", "negative"), ("a boring movie", "negative"),
    ("dull acting and a terrible plot", "negative"), ("the film was boring", "negative"),
    ("great great wonderful", "positive"), ("boring dull terrible", "negative"),
]


class CountingTokenizer:
    """Wraps a tokenizer and records what each call was asked to tokenize (in `calls`)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, text, **kw):
        self.calls.append(text)
        return self.tokenizer(text, **kw)

    @property
    def backend_tokenizer(self):  # PromptBuilder.encode_many may call the Rust tokenizer directly
        return _CountingRust(self.tokenizer.backend_tokenizer, self.calls)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


class _CountingRust:
    def __init__(self, rust, calls):
        self.rust, self.calls = rust, calls

    def encode_batch_fast(self, texts, **kw):
        self.calls.append(texts)
        return self.rust.encode_batch_fast(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.rust, name)


def sentiment_template():
    from icl_engine.core.prompt import Template

    return Template(instruction="Classify the review.", input_format="Review: {input}\nSentiment:",
                    output_format=" {output}", verbalizers={"positive": "A", "negative": "B"})


@pytest.fixture(scope="session")
def icl_forks():
    """`icl_forks.run(args, cwd=, env=)`: an `icl` command line in a process of its own, forked
    from one that has imported the CLI and torch once (tests/icl_forks.py says what differs from
    the installed script)."""
    from icl_forks import IclForks

    forks = IclForks()
    yield forks
    forks.close()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (Ray 2.60 has no local_mode): 2 CPUs, no
    dashboard. Skips where Ray is not installed (`bash scripts/test.sh` installs it)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'icl-engine[ray]')")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


CLASSIFY_TEXTS = [f"{t} {i}" for i in range(3) for t, _ in SENTIMENT_ROWS][:30]  # texts to label in the file tests


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random LM saved as a model folder (what `--lm PATH` loads), once per session."""
    root = tmp_path_factory.mktemp("tiny-lm")
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def classify_job(tmp_path_factory, tiny_lm_dir):
    """A tiny sentiment index, the tiny LM, a JSONL of CLASSIFY_TEXTS (field "review") and the
    single-process engine's predictions for them: what classify-file (one process or Ray) must equal."""
    import json

    from icl_engine.apps import indexes
    from icl_engine.core.config import PipelineConfig
    from icl_engine.core.engines import get_engine

    root = tmp_path_factory.mktemp("cf")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in SENTIMENT_ROWS))
    indexes.build_index(str(train), "tiny", embedder="hashing:64", indexes_dir=root / "indexes")
    src = root / "texts.jsonl"
    src.write_text("".join(json.dumps({"review": t}) + "\n" for t in CLASSIFY_TEXTS))
    config = PipelineConfig(index="tiny", indexes_dir=str(root / "indexes"), lm=str(tiny_lm_dir), k=2)
    return root, src, config, get_engine(config).classify(CLASSIFY_TEXTS, config.options)


@pytest.fixture(scope="session")
def classify_anchors(classify_job):
    """kNN-prompting anchors of classify_job's index with the tiny LM (icl anchors build)."""
    from icl_engine.apps import training

    root, _, config, _ = classify_job
    training.build_anchors("tiny", out=root / "anchors", lm=config.lm, indexes_dir=root / "indexes", support=64)
    return root / "anchors"
