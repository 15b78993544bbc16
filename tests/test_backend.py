"""The LM backend seam: a second backend plugs in through the registry and the engine gives the
same answers through it; the suite fails on the transformers deprecations we moved off."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from icl_engine.core.backend import BACKENDS, BackendError, LMBackend, Prefix, register_backend
from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.generate import cut_at_stop, generate
from icl_engine.core.index import ExampleIndex
from icl_engine.core.lm import LMLoadError, load_lm
from icl_engine.core.pipeline import Engine, PipelineConfig
from icl_engine.core.prompt import Template
from icl_engine.core.score import compute_prefix, next_token_logprobs, score_brute_force, score_continuations

from conftest import make_tiny_lm
from numerics import assert_probs_close, assert_scores_close

LABELS = [[10], [20, 21, 22], [30, 31], [40]]  # 1, 3, 2 and 1 tokens
INSTR = [1, 50, 51, 52, 53]


@dataclass
class FullRecompute:
    """A second backend: every log-prob from one plain forward over the whole sequence (prefix
    ids + row + continuation), batch 1, no KV cache, no padding, no packing; a prefix is kept as
    its ids and re-sent, as a remote server without prefix caching would."""

    model: torch.nn.Module
    tokenizer: object
    name: str = "full-recompute"
    device: torch.device = torch.device("cpu")

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def eos_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id}

    @torch.inference_mode()
    def logprobs(self, ids) -> torch.Tensor:
        """[N, V]: row t predicts ids[t + 1]."""
        return self.model(input_ids=torch.tensor([list(ids)])).logits[0].float().log_softmax(-1)

    def head(self, prefix: Prefix | None) -> list[int]:
        if prefix is not None and prefix.ids is None:
            raise BackendError("full-recompute: a prefix needs its ids (no soft prompts)")
        return list(prefix.ids) if prefix is not None else []

    def compute_prefix(self, ids=None, embeds=None, *, base=None) -> Prefix:
        if embeds is not None:
            raise BackendError("full-recompute: no soft prompts")
        ids = self.head(base) + list(ids or ())
        return Prefix(None, len(ids), logprobs=self.logprobs(ids)[-1], ids=tuple(ids))

    def sequence_logprobs(self, ids, prefix) -> torch.Tensor:
        head = self.head(prefix)
        return self.logprobs(head + list(ids))[len(head):]

    def next_token_logprobs(self, rows, prefix) -> torch.Tensor:
        return torch.stack([self.logprobs(self.head(prefix) + list(r))[-1] for r in rows])  # [B, V]

    def score_batch(self, rows, continuations, prefix) -> torch.Tensor:
        out = torch.zeros(len(rows), len(continuations))
        for i, r in enumerate(rows):
            ctx = self.head(prefix) + list(r)
            for j, c in enumerate(continuations):
                lp = self.logprobs(ctx + list(c))  # [N, V]
                out[i, j] = sum(lp[len(ctx) - 1 + t, tok] for t, tok in enumerate(c))
        return out

    def generate_batch(self, rows, *, prefix, max_new_tokens, stop, pick) -> list[str]:
        texts = []
        for r in rows:
            seq, new = self.head(prefix) + list(r), []
            for _ in range(max_new_tokens):
                tok = int(pick(self.logprobs(seq)[-1:])[0])
                if tok in self.eos_ids:
                    break
                seq.append(tok)
                new.append(tok)
                if stop and cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stop)[1]:
                    break
            texts.append(cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stop)[0])
        return texts


@pytest.fixture(scope="module")
def hf(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="module")
def ref(hf):
    """The second backend over the same weights, loaded through the registry."""
    register_backend("full-recompute", lambda name, **kw: FullRecompute(hf.model, hf.tokenizer, name))
    yield load_lm("tiny", backend="full-recompute")
    BACKENDS.pop("full-recompute")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[int(x) for x in rng.integers(3, 300, size=n)] for n in (5, 1, 12, 7, 3)]


def test_registry(ref, hf):
    assert isinstance(ref, FullRecompute) and ref.name == "tiny"
    assert isinstance(ref, LMBackend) and isinstance(hf, LMBackend)
    with pytest.raises(LMLoadError, match="unknown LM backend 'nope'.*full-recompute"):
        load_lm("tiny", backend="nope")


def test_scores_agree_across_backends(ref, hf, prompts):
    want = score_continuations(hf, prompts, LABELS, batch_size=3)
    assert_scores_close(score_continuations(ref, prompts, LABELS, batch_size=3), want, hf)
    assert_scores_close(score_brute_force(ref, prompts, LABELS), want, hf)
    assert_scores_close(next_token_logprobs(ref, prompts), next_token_logprobs(hf, prompts), hf)


def test_prefixes_agree_across_backends(ref, hf, prompts):
    p_hf, p_ref = compute_prefix(hf, ids=INSTR[:2]), compute_prefix(ref, ids=INSTR[:2])
    assert p_hf.ids == p_ref.ids == tuple(INSTR[:2])  # built from ids alone: the ids are kept
    p_hf, p_ref = compute_prefix(hf, ids=INSTR[2:], base=p_hf), compute_prefix(ref, ids=INSTR[2:], base=p_ref)
    assert p_hf.ids == p_ref.ids == tuple(INSTR) and p_ref.past_key_values is None
    rows = [[]] + prompts  # an empty row is predicted from the prefix's last position
    want = score_continuations(hf, rows, LABELS, prefix=p_hf)
    assert_scores_close(score_continuations(ref, rows, LABELS, prefix=p_ref), want, hf)
    assert_scores_close(score_brute_force(ref, rows, LABELS, prefix=p_ref), want, hf)
    soft = compute_prefix(hf, embeds=hf.model.get_input_embeddings()(torch.tensor(INSTR)).detach())
    assert soft.ids is None  # a soft prompt is not its ids
    with pytest.raises(BackendError, match="needs its ids"):
        score_continuations(ref, prompts, LABELS, prefix=soft)


def test_generation_agrees_across_backends(ref, hf, prompts):
    for prefix in (None, "instr"):
        p_hf, p_ref = (compute_prefix(hf, ids=INSTR), compute_prefix(ref, ids=INSTR)) if prefix else (None, None)
        want = generate(hf, prompts, max_new_tokens=6, stop=(), batch_size=2, prefix=p_hf)
        assert generate(ref, prompts, max_new_tokens=6, stop=(), batch_size=2, prefix=p_ref) == want
        assert any(want)


def test_engine_classifies_through_either_backend(ref, hf, tmp_path):
    texts = ["a wonderful film", "great acting", "a dull boring film", "terrible plot", "the movie was great",
             "a boring waste of time"]
    ds = Dataset("tiny", TaskKind.CLASSIFICATION, make_records(zip(texts, ["pos", "pos", "neg", "neg", "pos", "neg"])),
                 ("neg", "pos"))
    emb = get_embedder("hashing:64")
    ExampleIndex.build(ds, emb).save(tmp_path / "idx")
    template = Template(instruction="Sentiment.", input_format="Review: {input}\nSentiment:",
                        output_format=" {output}", verbalizers={"neg": "terrible bad", "pos": "great"})
    cfg = PipelineConfig(index=str(tmp_path / "idx"), template=template, k=3)
    queries = ["a great moving film", "boring and bad", "plot"]
    got = {}
    for name, lm in (("hf", hf), ("ref", ref)):
        eng = Engine.load(cfg, lm=lm, embedder=emb)
        assert eng.prefix is not None and eng.prefix.ids is not None  # the instruction goes through the seam
        got[name] = eng.classify(queries)
    for a, b in zip(got["hf"], got["ref"]):
        assert a.label == b.label and [d.id for d in a.demos] == [d.id for d in b.demos]
        assert_probs_close(list(a.probs.values()), list(b.probs.values()), a.log_scores, hf)


def test_deprecated_cache_kwarg_fails_the_suite(hf):
    """pyproject's filterwarnings turns the transformers FutureWarning (attributed to torch's
    Module.__call__, not to our module) into an error, so a call on the old API cannot slip back."""
    with pytest.raises(FutureWarning, match="past_key_values"):
        hf.model(input_ids=torch.tensor([[5, 6]]), past_key_values=None)
