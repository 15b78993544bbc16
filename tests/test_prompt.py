"""prompt.py: template validation, exact token accounting, chat rendering (tiny BPE, no downloads)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from icl_engine.core.data import TaskKind, make_records
from icl_engine.core.prompt import PARTS, PromptBuilder, PromptTooLong, Template
from icl_engine.core.select import select_demonstrations

from conftest import CountingTokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SENTIMENT = Template(
    instruction="Classify the sentiment of each movie review.",
    input_format="Review: {input}\nSentiment:",
    output_format=" {output}",
)
RECORDS = make_records([
    ("the movie was great and the acting was wonderful", "positive"),
    ("a dull boring film with a terrible plot", "negative"),
    ("wonderful acting, great music", "positive"),
    ("terrible", "negative"),
])
LABELS = ("negative", "positive")


@pytest.fixture
def builder(tiny_tokenizer):
    return PromptBuilder(SENTIMENT, tiny_tokenizer, labels=LABELS)


@pytest.fixture
def bos_tokenizer(tiny_tokenizer):
    """A copy that adds BOS itself, like many Llama checkpoints (never mutate the session one)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_bos_token = True
    tok.update_post_processor()
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    return tok


# ----------------------------------------------------------------------------- template


@pytest.mark.parametrize("kwargs, field", [
    (dict(input_format="Review:"), "input_format"),
    (dict(output_format="Label:"), "output_format"),
    (dict(input_format="{input} {label}"), "input_format"),
    (dict(output_format="{output} {}"), "output_format"),
    (dict(input_format="{input} {"), "input_format"),
    (dict(separator=""), "separator"),
    (dict(instruction=3), "instruction"),
    (dict(chat="yes"), "chat"),
    (dict(verbalizers={"pos": ""}), "verbalizers"),
    (dict(verbalizers={"pos": "good", "neg": "good"}), "verbalizers"),
])
def test_template_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Template.{field}") as e:
        Template(**kwargs)
    assert "\n" not in str(e.value)


def test_template_formats_and_defaults():
    t = Template(input_format="{{x}} {input}", output_format="{output}!", verbalizers={"pos": "good"})
    assert t.format_input("a {b}") == "{x} a {b}"  # literal braces; input text never re-formatted
    assert t.format_output("pos") == "good!" and t.format_output("neg") == "neg!"
    c = Template.default(TaskKind.CLASSIFICATION)
    assert (c.input_format, c.output_format, c.separator) == ("{input}\nAnswer:", " {output}", "\n\n")
    g = Template.default("generation", chat=True)
    assert (g.input_format, g.output_format, g.chat) == ("Input: {input}\nOutput:", " {output}", True)


def test_template_json_round_trip(tmp_path):
    t = Template(instruction="Say {it}.", input_format="Q: {input}\nA:", verbalizers={"pos": "yes", "neg": "no"},
                 chat=True)
    path = tmp_path / "template.json"
    t.to_json(path)
    assert Template.from_json(path) == t
    text = path.read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys
    path.write_text('{"input_format": "{input}", "colour": 1}')
    with pytest.raises(ValueError, match="unknown template fields"):
        Template.from_json(path)
    path.write_text('{"input_format": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        Template.from_json(path)
    with pytest.raises(ValueError, match="cannot read"):
        Template.from_json(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- token accounting


def check_spans(prompt):
    assert prompt.spans[0].start == 0 and prompt.spans[-1].end == len(prompt.ids)
    assert all(a.end == b.start for a, b in zip(prompt.spans, prompt.spans[1:]))
    assert sum(len(s) for s in prompt.spans) == len(prompt.ids)
    assert all(s.part in PARTS for s in prompt.spans)


def test_spans_cover_ids_and_decode_to_the_parts(builder, tiny_tokenizer):
    p = builder.assemble(RECORDS[:3], "a great plot")
    check_spans(p)
    dec = [(s.part, tiny_tokenizer.decode(p.ids[s.start:s.end]), s.record_id) for s in p.spans]
    sep = ("separator", "\n\n", None)
    assert dec == [
        ("instruction", SENTIMENT.instruction, None), sep,
        *[x for r in RECORDS[:3] for x in (("demo", f"Review: {r.input}\nSentiment: {r.output}", r.id), sep)],
        ("query", "Review: a great plot\nSentiment:", None),
    ]
    assert p.demo_ids == [r.id for r in RECORDS[:3]]
    assert p.shared_len == len(builder.shared_ids()) and p.ids[: p.shared_len] == builder.shared_ids()


def test_demo_ids_are_query_ids_plus_label_ids(builder):
    for r in RECORDS:  # the consistency the scorer relies on
        assert builder.demo_ids(r) == builder.query_ids(r.input) + builder.label_ids(r.output)


def test_demo_length_is_what_a_demo_adds(builder):
    for n in range(len(RECORDS)):
        before = builder.assemble(RECORDS[:n], "query text")
        after = builder.assemble(RECORDS[: n + 1], "query text")
        assert len(after.ids) - len(before.ids) == builder.demo_length(RECORDS[n])
    lengths = builder.demo_lengths(RECORDS)
    assert lengths([2, 0]) == [builder.demo_length(RECORDS[2]), builder.demo_length(RECORDS[0])]
    p = builder.assemble(RECORDS, "q")
    assert len(p.ids) == builder.reserved("q") - builder.max_answer_len + sum(lengths(range(4)))


def test_multi_token_verbalizer(tiny_tokenizer):
    t = Template(input_format="{input}\nAnswer:", output_format=" {output}",
                 verbalizers={"positive": "great movie", "negative": "dull boring film"})
    b = PromptBuilder(t, tiny_tokenizer, labels=LABELS)
    ids = b.label_ids("negative")
    assert len(ids) > 1 and tiny_tokenizer.decode(ids) == " dull boring film"
    assert b.max_answer_len == max(len(b.label_ids(lab)) for lab in LABELS)
    r = RECORDS[1]
    assert b.demo_ids(r) == b.query_ids(r.input) + ids
    assert tiny_tokenizer.decode(b.demo_ids(r)).endswith("Answer: dull boring film")


def test_bos_is_added_only_when_the_tokenizer_adds_one(tiny_tokenizer, bos_tokenizer):
    plain = PromptBuilder(SENTIMENT, tiny_tokenizer, labels=LABELS).assemble(RECORDS[:1], "x")
    assert plain.spans[0].part == "instruction"
    b = PromptBuilder(SENTIMENT, bos_tokenizer, labels=LABELS)
    p1, p2 = b.assemble(RECORDS[:2], "x"), b.assemble([], "another query")
    check_spans(p1)
    assert p1.spans[0].part == "bos" and p1.ids[0] == bos_tokenizer.bos_token_id and p1.ids.count(p1.ids[0]) == 1
    assert p1.shared_len == p2.shared_len == len(plain.ids[: plain.shared_len]) + 1
    assert p1.ids[: p1.shared_len] == p2.ids[: p2.shared_len] == b.shared_ids()
    no_instr = PromptBuilder(Template(input_format="{input}"), bos_tokenizer).assemble([], "x")
    assert [s.part for s in no_instr.spans] == ["bos", "query"] and no_instr.shared_len == 1


def test_budget_is_exact_and_nothing_is_truncated(builder):
    query, total, n_virtual = "a great plot", 120, 5
    room = total - builder.reserved(query, n_virtual)
    lengths = builder.demo_lengths(RECORDS)
    fits = [r for r in range(4) if sum(lengths(range(r + 1))) <= room]
    assert fits and len(fits) < 4  # the test budget binds
    p = builder.assemble([RECORDS[i] for i in fits], query, budget=total - n_virtual)
    assert len(p.ids) + builder.max_answer_len + n_virtual <= total
    with pytest.raises(PromptTooLong, match=f"budget is {total - n_virtual}"):
        builder.assemble(RECORDS, query, budget=total - n_virtual)
    alone = builder.reserved(query)
    builder.assemble([], query, budget=alone)  # exactly fits
    with pytest.raises(PromptTooLong, match="query alone") as e:
        builder.assemble([], query, budget=alone - 1)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert builder.reserved(query, answer_tokens=0) == alone - builder.max_answer_len


def test_selection_and_assembly_fit_the_budget_together(builder):
    """The pipeline's recipe: select with total - reserved, assemble with total."""

    class Index:
        records = RECORDS
        vectors = np.eye(4, dtype=np.float32)
        labels = LABELS

        def search(self, qv, k):
            sims = qv @ self.vectors.T
            ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sims, ids, 1).astype(np.float32), ids.astype(np.int64)

    q = np.array([0.1, 0.2, 0.9, 0.3], np.float32)
    for total in range(40, 140, 7):
        room = total - builder.reserved("a great plot")
        sel = select_demonstrations(Index(), q, k=4, budget=room, demo_lengths=builder.demo_lengths(RECORDS))
        if room < 0:
            with pytest.raises(PromptTooLong):
                builder.assemble([], "a great plot", budget=total)
            continue
        p = builder.assemble([RECORDS[i] for i in sel.ids], "a great plot", budget=total)
        assert len(p.ids) + builder.max_answer_len <= total
        if builder.demo_length(RECORDS[2]) <= room:
            assert p.demo_ids[-1] == RECORDS[2].id  # the most similar sits right before the query


# ----------------------------------------------------------------------------- chat


def test_chat_rendering_matches_the_chat_template(chat_tokenizer):
    t = Template(instruction=SENTIMENT.instruction, input_format=SENTIMENT.input_format,
                 output_format=" {output}", chat=True)
    b = PromptBuilder(t, chat_tokenizer, labels=LABELS)
    p = b.assemble(RECORDS[:2], "a great plot")
    check_spans(p)
    user = "\n\n".join([*(t.format_input(r.input) + t.format_output(r.output) for r in RECORDS[:2]),
                        t.format_input("a great plot")])
    msgs = [{"role": "system", "content": t.instruction}, {"role": "user", "content": user}]
    rendered = chat_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat_tokenizer.decode(p.ids) == rendered
    parts = [s.part for s in p.spans]
    assert parts == ["instruction", "demo", "separator", "demo", "separator", "query", "suffix"]
    suffix = p.spans[-1]
    assert chat_tokenizer.decode(p.ids[suffix.start:]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert p.ids[: p.shared_len] == b.shared_ids()
    assert chat_tokenizer.decode(b.shared_ids()).endswith("<|im_start|>user\n")
    # the fixed chat tokens are reserved, so accounting stays exact
    assert len(p.ids) == b.reserved("a great plot") - b.max_answer_len + sum(b.demo_lengths(RECORDS)([0, 1]))


def test_chat_needs_a_chat_template(tiny_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        PromptBuilder(Template(chat=True), tiny_tokenizer)


def test_batched_tokenization_equals_one_by_one(tiny_tokenizer):
    """query_ids_many and the demo-length table give exactly the one-text-at-a-time ids and
    lengths, the missing demos tokenized in one call."""
    builder = PromptBuilder(SENTIMENT, tiny_tokenizer, labels=LABELS)
    queries = [r.input for r in RECORDS] + ["", "  spaced  out  "]
    assert builder.query_ids_many(queries) == [builder.query_ids(q) for q in queries]
    assert builder.query_ids_many([]) == []
    builder.label_ids(LABELS[0]), builder.label_ids(LABELS[1])  # labels cached first
    counting = builder.tokenizer = CountingTokenizer(builder.tokenizer)
    calls = counting.calls
    lengths = builder.demo_lengths(RECORDS)
    got = lengths([3, 1, 3, 0])
    assert len(calls) == 1 and len(calls[0]) == 3  # rows 3, 1, 0 in one call
    assert lengths([0, 1, 2, 3]) == [builder.demo_length(r) for r in RECORDS[:4]]
    assert got == [builder.demo_length(RECORDS[i]) for i in (3, 1, 3, 0)]
    assert len(calls) == 2  # only row 2 was new
    q = builder.query_ids("q")
    assert builder.assemble(RECORDS[:2], "q", query_ids=q).ids == builder.assemble(RECORDS[:2], "q").ids
    assert builder.reserved("q", query_ids=q) == builder.reserved("q")


def test_encode_many_takes_the_rust_path_only_where_it_equals_the_tokenizers_call(tiny_tokenizer):
    """encode_many calls the Rust tokenizer's encode_batch_fast (no Python wrapper, no offsets)
    and gets the ids of the tokenizer's own call, special-token text and odd whitespace included;
    a backend set to truncate, or to split special tokens unlike the call, takes the call."""
    tok = copy.deepcopy(tiny_tokenizer)
    texts = ["great <|im_start|> film", "<|endoftext|>", "  two  spaces\t\ttabs\n\n", "\u00e9\u4e2d\U0001f642",
             "", "wonderful " * 300, "Review: <|im_end|>\nSentiment:"]
    want = lambda: [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    builder = PromptBuilder(SENTIMENT, tok, labels=LABELS)
    assert builder._rust_encoder() is not None
    assert builder.encode_many(texts) == want() == [builder.encode(t) for t in texts]
    tok.backend_tokenizer.enable_truncation(4)
    assert builder._rust_encoder() is None
    assert builder.encode_many(texts) == want() and max(map(len, want())) > 4  # the call turns it off
    whole = want()
    tok.split_special_tokens = True
    assert builder._rust_encoder() is None
    assert builder.encode_many(texts) == want() != whole  # "<|im_start|>" now in pieces


def piece_by_piece(builder, demos, query):
    """The assembly as first written (every piece listed, then joined), from fresh tokenizer
    calls: what the cached assembly must equal id for id and span for span."""
    enc = builder.encode
    t = builder.template
    shared = builder.shared_ids()
    alone = builder.assemble([], query)
    q = enc(t.format_input(query))
    tail = alone.ids[alone.spans[-1].start:] if alone.spans[-1].part == "suffix" else []
    parts = [(s.part, alone.ids[s.start:s.end], None) for s in alone.spans if s.end <= len(shared)]
    for r in demos:
        parts += [("demo", enc(t.format_input(r.input)) + enc(t.format_output(r.output)), r.id),
                  ("separator", enc(t.separator), None)]
    parts += [("query", q, None)] + ([("suffix", tail, None)] if tail else [])
    ids, spans = [], []
    for part, piece, rid in parts:
        spans.append((part, len(ids), len(ids) + len(piece), rid))
        ids += piece
    return ids, spans


@pytest.mark.parametrize("kind", ["plain", "bos", "chat", "no instruction"])
def test_cached_assembly_equals_piece_by_piece(kind, tiny_tokenizer, bos_tokenizer, chat_tokenizer):
    """assemble() reuses cached demo ids and a prebuilt head; on many records, any number of
    demos and any order, its ids and spans are those of tokenizing every piece afresh."""
    tok = {"plain": tiny_tokenizer, "bos": bos_tokenizer, "chat": chat_tokenizer,
           "no instruction": tiny_tokenizer}[kind]
    template = Template(input_format="Review: {input}\nSentiment:", output_format=" {output}", chat=kind == "chat",
                        instruction="" if kind == "no instruction" else SENTIMENT.instruction)
    builder = PromptBuilder(template, tok, labels=LABELS)
    rng = np.random.default_rng(0)
    words = "the a movie great dull plot acting wonderful terrible film boring , . ! music".split()
    records = make_records([(" ".join(rng.choice(words, size=rng.integers(0, 12))), LABELS[i % 2])
                            for i in range(60)])
    for i in range(40):
        demos = [records[j] for j in rng.choice(len(records), size=rng.integers(0, 9), replace=False)]
        query = " ".join(rng.choice(words, size=rng.integers(0, 10)))
        got = builder.assemble(demos, query, budget=10_000)
        ids, spans = piece_by_piece(PromptBuilder(template, tok, labels=LABELS), demos, query)
        assert got.ids == ids
        assert [(s.part, s.start, s.end, s.record_id) for s in got.spans] == spans
        check_spans(got)
    assert builder.max_answer_len == max(len(builder.label_ids(lab)) for lab in LABELS)
