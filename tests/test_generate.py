"""Decode loop: batched == one by one == a no-cache brute-force loop; stops; seeded sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_engine.core.generate import cut_at_stop, generate, sample_next
from icl_engine.core.lm import LM
from icl_engine.core.score import ScoreError, compute_prefix

from conftest import make_tiny_lm, make_tiny_model


@pytest.fixture(scope="module")
def lm(tiny_tokenizer) -> LM:
    return make_tiny_lm(tiny_tokenizer)  # sharp: greedy paths depend on the whole prompt


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [[int(x) for x in rng.integers(3, 300, size=n)] for n in (6, 1, 11, 4, 17)]


def brute_force_greedy(lm: LM, prompt: list[int], max_new_tokens: int) -> str:
    """argmax of a full forward over everything so far, every step; no cache, no batch."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
            if tok == lm.tokenizer.eos_token_id:
                break
            ids.append(tok)
            new.append(tok)
    return lm.tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_matches_brute_force(lm, prompts):
    got = generate(lm, prompts, max_new_tokens=10, stop=(), batch_size=3)
    assert got == [brute_force_greedy(lm, p, 10) for p in prompts]
    assert len(set(got)) == len(got)  # the prompts matter


@pytest.mark.parametrize("stop", [(), ("e", "a")])  # stops: rows leave the batch at different steps
def test_greedy_batch_equals_one_by_one(lm, prompts, stop):
    batched = generate(lm, prompts, max_new_tokens=10, stop=stop, batch_size=len(prompts))
    assert batched == [generate(lm, [p], max_new_tokens=10, stop=stop)[0] for p in prompts]
    if stop:
        assert all(not any(s in t for s in stop) for t in batched)


def test_prefix_equals_concatenated_ids(lm, prompts):
    instr = [1, 50, 51, 52]
    with_prefix = generate(lm, prompts, prefix=compute_prefix(lm, ids=instr), max_new_tokens=8, stop=())
    assert with_prefix == generate(lm, [instr + p for p in prompts], max_new_tokens=8, stop=())
    empty = generate(lm, [[]], prefix=compute_prefix(lm, ids=instr), max_new_tokens=8, stop=())
    assert empty == generate(lm, [instr], max_new_tokens=8, stop=())


def test_sampling_is_seeded(lm, prompts):
    a = generate(lm, prompts, do_sample=True, seed=3, max_new_tokens=10, stop=())
    assert a == generate(lm, prompts, do_sample=True, seed=3, max_new_tokens=10, stop=())
    assert a != generate(lm, prompts, do_sample=True, seed=4, max_new_tokens=10, stop=())
    # a nucleus this small keeps only the top token: sampling becomes greedy
    greedy = generate(lm, prompts, max_new_tokens=10, stop=())
    assert generate(lm, prompts, do_sample=True, top_p=1e-6, seed=5, max_new_tokens=10, stop=()) == greedy


def test_sample_next_top_p():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(2000, 3)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(lp, do_sample=True, temperature=1.0, top_p=0.6, generator=g)
    counts = torch.bincount(picks, minlength=3)
    assert counts[2] == 0 and 0.55 < counts[0] / 2000 < 0.70  # 0.5/0.8 kept mass
    assert sample_next(lp[:1], do_sample=False, temperature=1.0, top_p=1.0, generator=None).item() == 0


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef\n\n", ["\n\n"]) == ("abc", True)
    assert cut_at_stop("a.b;c", [";", "."]) == ("a", True)  # the earliest stop wins, not the first listed
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)  # empty stops are ignored


# --------------------------------------------------------------------------- a model that parrots


def parrot_lm(tokenizer, successor: dict[int, int]) -> LM:
    """Zeroed attention/MLP outputs leave the residual stream equal to the current token's
    embedding, so lm_head alone picks the next token: token a is always followed by successor[a]."""
    model = make_tiny_model(len(tokenizer), tie_word_embeddings=False)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight  # [V, H]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head[list(set(successor.values()))] = 0.0
        for i, (a, b) in enumerate(successor.items()):
            emb[a] = 0.0
            emb[a, i] = 1.0  # a one-hot direction per token
            head[b, i] = 10.0
    return LM(model, tokenizer, "parrot", torch.device("cpu"))


@pytest.fixture(scope="module")
def parrot(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = lambda s: tok(s).input_ids  # noqa: E731
    g, re, at, f, i, l, m, nl = ids(" great film\n")
    bo, r, ing = ids(" boring")
    succ = {g: re, re: at, at: f, f: i, i: l, l: m, m: nl, nl: nl, bo: r, r: ing, ing: tok.eos_token_id}
    return parrot_lm(tok, succ), [g], [bo]


def test_parrot_stops(parrot):
    lm, great, boring = parrot
    assert generate(lm, [great], max_new_tokens=10, stop=()) == ["reat film\n\n\n\n"]  # 10 tokens
    assert generate(lm, [great], max_new_tokens=3, stop=()) == ["reat f"]
    # "\n\n" arrives as two tokens: matched on the decoded text, cut before it
    assert generate(lm, [great], max_new_tokens=30) == ["reat film"]
    assert generate(lm, [great], max_new_tokens=30, stop=("lm", "x")) == ["reat fi"]  # mid-token cut
    assert generate(lm, [great], max_new_tokens=30, stop="at f") == ["re"]
    assert generate(lm, [boring], max_new_tokens=30, stop=()) == ["ring"]  # eos ends it, eos not in text
    # rows finishing at different steps leave the batch without disturbing the others
    assert generate(lm, [great, boring, [9] + great], max_new_tokens=30) == generate(
        lm, [great], max_new_tokens=30) + generate(lm, [boring], max_new_tokens=30) + ["reat film"]


def test_generate_errors(lm):
    with pytest.raises(ScoreError, match="temperature"):
        generate(lm, [[1]], do_sample=True, temperature=0.0)
    with pytest.raises(ScoreError, match="top_p"):
        generate(lm, [[1]], top_p=0.0)
    assert generate(lm, [[1, 2]], max_new_tokens=0) == [""]
