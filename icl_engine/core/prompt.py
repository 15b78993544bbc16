"""Stage 5: demonstrations + query -> exact token ids, with the span of every part.

A prompt is a concatenation of separately tokenised pieces:

    plain:  [bos] [instruction separator] (demo separator)* query
    chat:   chat_prefix (demo separator)* query chat_suffix

    demo   = ids(input_format(input)) + ids(output_format(verbalizer(label)))
    query  = ids(input_format(query))
    answer = ids(output_format(verbalizer(label)))          (what the scorer reads)

Tokenising pieces separately, never the joined string, is what makes the accounting exact: a
demo costs the same tokens in every prompt (`demo_length` is exactly what it adds), and a demo
is token for token the query followed by its answer, as the scorer sees it.

Chat (`Template.chat`): the chat template is rendered once, with the instruction as the system
message and a sentinel as the user turn; the ids before the sentinel (`chat_prefix`, e.g.
"<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n") and after it (`chat_suffix`, end
of the user turn + the assistant header) are fixed, so they are counted once like the
instruction. Demos and the query are the user turn; the answer is the assistant's reply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from string import Formatter
from typing import Callable, Sequence

import numpy as np

from .atomic import read_json, write_json
from .data import Record, TaskKind

__all__ = ["Template", "PromptBuilder", "Prompt", "Span", "PromptTooLong", "PARTS", "start_ids"]

PARTS = ("bos", "instruction", "demo", "separator", "query", "suffix")  # Span.part values
_SENTINEL = "\u2063ICL_USER_TURN\u2063"  # stands for the user turn when rendering a chat template


class PromptTooLong(ValueError):
    """The prompt does not fit the token budget; one-line message with the numbers."""


# ----------------------------------------------------------------------------- template


def _placeholders(fmt: str, name: str) -> set[str]:
    try:
        return {f for _, f, _, _ in Formatter().parse(fmt) if f is not None}
    except ValueError as e:  # e.g. a lone "{"
        raise ValueError(f"Template.{name}: {e} in {fmt!r} (write literal braces as {{{{ and }}}})") from None


@dataclass(frozen=True)
class Template:
    instruction: str = ""  # literal text (no placeholders) before the demos; chat: system message
    input_format: str = "{input}\n"
    output_format: str = "{output}"
    separator: str = "\n\n"  # between parts; also the stop string for generation
    verbalizers: dict[str, str] = field(default_factory=dict)  # label -> text shown (default: label)
    chat: bool = False

    def __post_init__(self):
        for f in ("instruction", "input_format", "output_format", "separator"):
            if not isinstance(getattr(self, f), str):
                raise ValueError(f"Template.{f} must be a string, got {type(getattr(self, f)).__name__}")
        for name, want in (("input_format", "input"), ("output_format", "output")):
            found = _placeholders(getattr(self, name), name)
            if want not in found:
                raise ValueError(f"Template.{name} must contain {{{want}}}, got {getattr(self, name)!r}")
            if found - {want}:
                raise ValueError(f"Template.{name}: unknown placeholders {sorted(found - {want})} (only {{{want}}})")
        if not self.separator:
            raise ValueError("Template.separator must not be empty (it separates demos and stops generation)")
        if not isinstance(self.chat, bool):
            raise ValueError(f"Template.chat must be true or false, got {self.chat!r}")
        if not isinstance(self.verbalizers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in self.verbalizers.items()
        ):
            raise ValueError(f"Template.verbalizers must map labels to non-empty strings, got {self.verbalizers!r}")
        if len(set(self.verbalizers.values())) != len(self.verbalizers):
            raise ValueError(f"Template.verbalizers: two labels share a text (indistinguishable): {self.verbalizers}")
        object.__setattr__(self, "verbalizers", dict(self.verbalizers))  # our own copy

    @classmethod
    def default(cls, kind: TaskKind | str, **overrides) -> "Template":
        """Generic defaults per task kind; a dataset usually deserves its own wording."""
        base = {
            TaskKind.CLASSIFICATION: dict(input_format="{input}\nAnswer:", output_format=" {output}"),
            TaskKind.GENERATION: dict(input_format="Input: {input}\nOutput:", output_format=" {output}"),
        }[TaskKind(kind)]
        return cls(**{**base, "separator": "\n\n", **overrides})

    def verbalize(self, label: str) -> str:
        return self.verbalizers.get(label, label)

    def format_input(self, text: str) -> str:
        return self.input_format.format(input=text)

    def format_output(self, label: str) -> str:
        return self.output_format.format(output=self.verbalize(label))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Template":
        if not isinstance(d, dict):
            raise ValueError(f"a template must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown template fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        """Write atomically (temp file beside it, then rename), sorted keys."""
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> "Template":
        d = read_json(path, "the template")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- prompt


@dataclass(frozen=True)
class Span:
    part: str  # one of PARTS
    start: int
    end: int  # exclusive: ids[start:end]
    record_id: str | None = None  # demos only

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Prompt:
    """A prompt's token ids and what each run of them is. The spans are built when first read:
    scoring reads only the ids, and a prompt holds ~2k + 3 spans (k demonstrations)."""

    ids: list[int]
    head: tuple[Span, ...]  # bos / instruction / separator: the builder's, the same in every prompt
    demos: tuple[tuple[str, int], ...]  # (record id, demo tokens) of each demonstration, in prompt order
    sep: int  # separator tokens after each demonstration
    tail: tuple[tuple[str, int], ...]  # (part, tokens): the query, then the chat suffix if any

    @cached_property
    def spans(self) -> list[Span]:
        """Contiguous runs that cover ids exactly: sum of lengths == len(ids)."""
        spans, n = list(self.head), self.shared_len
        for rid, m in self.demos:
            spans += (Span("demo", n, n + m, rid), Span("separator", n + m, n + m + self.sep))
            n += m + self.sep
        for part, m in self.tail:
            spans.append(Span(part, n, n + m))
            n += m
        return spans

    @property
    def shared_len(self) -> int:
        """Leading tokens identical in every prompt of this template (bos + instruction +
        separator, or the chat prefix): everything before the first demo or the query."""
        return self.head[-1].end if self.head else 0

    @property
    def demo_ids(self) -> list[str]:
        """Record ids of the demonstrations, in prompt order."""
        return [rid for rid, _ in self.demos]


def start_ids(tokenizer) -> list[int]:
    """What the tokenizer itself puts before a text: BOS for checkpoints whose post-processor
    adds one (many Llamas), nothing for SmolLM2 / GPT-2 style ones. In transformers 5 this is
    per checkpoint (add_bos_token defaults to False, the tokenizer.json post-processor
    decides), so it is measured, not assumed. A trailing EOS is ignored."""
    full = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    n = len(full) - len(plain)
    return full[:n] if n > 0 and full[n:] == plain else []


class PromptBuilder:
    """Exact token ids for a template and tokenizer. `labels` (the index's label order) set the
    room `reserved` keeps for the longest answer; default: the template's verbalizer labels."""

    def __init__(self, template: Template, tokenizer, labels: Sequence[str] = ()):
        self.template = template
        self.tokenizer = tokenizer
        self.labels = tuple(labels) or tuple(template.verbalizers)
        self._demos: dict[str, list[int]] = {}  # record id -> demo ids (without separator)
        self._answers: dict[str, list[int]] = {}  # label -> continuation ids
        self.sep_ids = self.encode(template.separator)
        if template.chat:
            prefix, suffix = self._render_chat()
            self._head = [("instruction", prefix)]
            self._tail = [("suffix", suffix)]
        else:
            instruction = self.encode(template.instruction) if template.instruction else []
            self._head = [("bos", start_ids(tokenizer)), ("instruction", instruction)]
            if instruction:
                self._head.append(("separator", self.sep_ids))
            self._tail = []
        self._head = [(p, ids) for p, ids in self._head if ids]  # no empty spans
        self._tail = [(p, ids) for p, ids in self._tail if ids]
        # assemble() starts every prompt from these: the head's ids and spans never change
        self._head_ids = self.shared_ids()
        spans, start = [], 0
        for part, ids in self._head:
            spans.append(Span(part, start, start + len(ids)))
            start += len(ids)
        self._head_spans = tuple(spans)
        self._tail_lengths = tuple((part, len(ids)) for part, ids in self._tail)
        self._fixed = sum(len(ids) for _, ids in self._head + self._tail)  # tokens besides demos, query, answer
        self._max_answer: int | None = None  # max_answer_len, once the labels are tokenized

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in one tokenizer call (a fast tokenizer batches in Rust; the
        ids are the same as text by text: no padding, no special tokens)."""
        if not texts:
            return []
        fast = self._rust_encoder()
        if fast is not None:  # the same ids without the Python wrapper and without offsets
            return [e.ids for e in fast(list(texts), add_special_tokens=False)]
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def _rust_encoder(self):
        """The Rust tokenizer's `encode_batch_fast` when calling it gives what the tokenizer's own
        call gives: a transformers fast tokenizer whose backend neither truncates nor pads and
        treats special-token text as the call would (`split_special_tokens`). None otherwise."""
        tok = self.tokenizer
        rust = getattr(tok, "backend_tokenizer", None)
        if (rust is None or not hasattr(rust, "encode_batch_fast") or rust.truncation is not None
                or rust.padding is not None
                or rust.encode_special_tokens != bool(getattr(tok, "split_special_tokens", False))):
            return None
        return rust.encode_batch_fast

    def _render_chat(self) -> tuple[list[int], list[int]]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("Template.chat is true but the tokenizer has no chat template")
        msgs = [{"role": "system", "content": self.template.instruction}] if self.template.instruction else []
        msgs.append({"role": "user", "content": _SENTINEL})
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if text.count(_SENTINEL) != 1:
            raise ValueError("Template.chat: the tokenizer's chat template does not show the user turn verbatim")
        before, after = text.split(_SENTINEL)
        # The rendered text carries the template's own special tokens (bos included, if any).
        return self.encode(before), self.encode(after)

    # ------------------------------------------------------------------ pieces

    def shared_ids(self) -> list[int]:
        """The tokens every prompt starts with (== prompt.ids[:prompt.shared_len])."""
        return [t for _, ids in self._head for t in ids]

    def query_ids(self, query: str) -> list[int]:
        return self.encode(self.template.format_input(query))

    def query_ids_many(self, queries: Sequence[str]) -> list[list[int]]:
        """`query_ids` of each query, tokenized in one call: the ids a batch of queries reuses
        for its budgets (`reserved(..., query_ids=)`) and its prompts (`assemble(..., query_ids=)`)."""
        return self.encode_many([self.template.format_input(q) for q in queries])

    def label_ids(self, label: str) -> list[int]:
        """The continuation scored for `label` (verbalised, output_format applied); cached."""
        if label not in self._answers:
            self._answers[label] = self.encode(self.template.format_output(label))
        return self._answers[label]

    def demo_ids(self, record: Record) -> list[int]:
        """== query_ids(record.input) + label_ids(record.output); cached by record id."""
        if record.id not in self._demos:
            self._demos[record.id] = self.query_ids(record.input) + self.label_ids(record.output)
        return self._demos[record.id]

    def demo_length(self, record: Record) -> int:
        """Exactly what this demo adds to any prompt: its ids plus the separator after it."""
        return len(self.demo_ids(record)) + len(self.sep_ids)

    def demo_lengths(self, records: Sequence[Record]) -> Callable[[Sequence[int]], list[int]]:
        """The `demo_lengths(row_ids) -> list[int]` callable select.py wants, over
        index.records. Lengths live in one array per `records` (-1 = not tokenized yet); the
        rows missing are tokenized together, in one call, the first time they are asked for."""
        table = self._length_table(records)

        def lengths(rows: Sequence[int]) -> list[int]:
            rows = np.asarray(rows, np.int64)
            out = table[rows]  # [r]
            if (out < 0).any():
                self._fill_lengths(records, table, np.unique(rows[out < 0]))
                out = table[rows]
            return out.tolist()

        return lengths

    def _length_table(self, records: Sequence[Record]) -> np.ndarray:
        # one table per records tuple (an index's records; `add` makes a new tuple)
        if getattr(self, "_table_of", None) is not records:
            self._table_of, self._table = records, np.full(len(records), -1, np.int64)
        return self._table

    def _fill_lengths(self, records: Sequence[Record], table: np.ndarray, rows: np.ndarray) -> None:
        todo = [records[i] for i in rows.tolist() if records[i].id not in self._demos]
        inputs = self.encode_many([self.template.format_input(r.input) for r in todo])
        for r, ids in zip(todo, inputs):
            self._demos[r.id] = ids + self.label_ids(r.output)  # == demo_ids(r)
        table[rows] = [len(self._demos[records[i].id]) + len(self.sep_ids) for i in rows.tolist()]

    @property
    def max_answer_len(self) -> int:
        if self._max_answer is None:  # labels and template are fixed: tokenized once
            self._max_answer = max((len(self.label_ids(lab)) for lab in self.labels), default=0)
        return self._max_answer

    def reserved(self, query: str, n_virtual_tokens: int = 0, answer_tokens: int | None = None, *,
                 query_ids: Sequence[int] | None = None) -> int:
        """Tokens a prompt for `query` needs besides its demos: soft-prompt tokens, bos +
        instruction (or chat prefix/suffix), the query and the longest answer (answer_tokens
        overrides, e.g. max_new_tokens for generation). Demo budget = total - reserved.
        `query_ids`: the query's ids when already tokenized (`query_ids_many`)."""
        answer = self.max_answer_len if answer_tokens is None else answer_tokens
        q = self.query_ids(query) if query_ids is None else query_ids
        return n_virtual_tokens + self._fixed + len(q) + answer

    # ------------------------------------------------------------------ assembly

    def assemble(self, demos: Sequence[Record], query: str, *, budget: int | None = None,
                 answer_tokens: int | None = None, query_ids: Sequence[int] | None = None) -> Prompt:
        """The prompt for `query` with `demos` in the given (prompt) order. With `budget` (total
        tokens for prompt + answer, soft-prompt tokens already taken off) nothing is truncated:
        PromptTooLong if the query alone, or the whole prompt, does not fit. `query_ids`: the
        query's ids when already tokenized (`query_ids_many`)."""
        q = self.query_ids(query) if query_ids is None else query_ids
        # head, then (demo, separator)*, then query and tail; the spans are built only if read
        ids, sep, demo = list(self._head_ids), self.sep_ids, self.demo_ids
        lengths = []
        for r in demos:
            piece = demo(r)
            ids += piece
            ids += sep
            lengths.append((r.id, len(piece)))
        ids += q
        for _, piece in self._tail:
            ids += piece
        prompt = Prompt(ids, self._head_spans, tuple(lengths), len(sep),
                        (("query", len(q)), *self._tail_lengths))
        if budget is not None:
            answer = self.max_answer_len if answer_tokens is None else answer_tokens
            alone = self.reserved(query, 0, answer, query_ids=q)
            if alone > budget:
                raise PromptTooLong(f"the query alone needs {alone} tokens ({len(q)} query + "
                                    f"{alone - len(q) - answer} template + {answer} answer) but the budget is {budget}")
            if len(ids) + answer > budget:
                raise PromptTooLong(f"the prompt needs {len(ids) + answer} tokens ({len(demos)} demonstrations, "
                                    f"{answer} answer) but the budget is {budget}")
        return prompt
