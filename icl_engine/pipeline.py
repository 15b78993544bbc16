"""The whole flow: index -> select -> assemble -> score / generate.

    engine = Engine.load(PipelineConfig(index="rt"))
    [pred] = engine.classify(["a tender, funny film"])      # label, probs, demonstrations

Every stage lives in its own module; this file only wires them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .adapters import SoftPrompt
from .config import PipelineConfig
from .data import TaskKind
from .embed import Embedder
from .generate import generate, generate_stream
from .knn_prompt import Anchors, KnnPrompter
from .lm import LM
from .prompt import Prompt, PromptBuilder, Template
from .readout import AnchorReadout, LinearReadout
from .score import (Calibration, PendingScores, Prefix, compute_prefix, contextual_calibrate, launch_scores,
                    normalize, pmi)
from .select import Selection, SelectionMethod, select_many


if TYPE_CHECKING:  # faiss (index.py) is needed to load an index, not to run an engine over one in memory
    from .index import ExampleIndex

__all__ = ["PipelineConfig", "Engine", "Prediction", "Generation", "Demo", "Prepared", "Launched"]

CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021


@dataclass(frozen=True)
class Demo:
    id: str
    score: float
    input: str
    output: str


@dataclass(frozen=True)
class Prediction:
    label: str
    probs: dict[str, float]  # label -> probability, in the index's label order
    demos: list[Demo]
    prompt_tokens: int
    skipped: tuple[str, ...] = ()  # ids of demonstrations too long for the budget on their own
    log_scores: list[float] = field(default_factory=list)  # uncalibrated log p(label | prompt)
    dropped: int = 0  # demonstrations left out because the more similar ones kept filled the budget
    short: int = 0  # fewer demonstrations than k: the index has no more distinct inputs


@dataclass(frozen=True)
class Generation:
    text: str
    demos: list[Demo]
    prompt_tokens: int
    skipped: tuple[str, ...] = ()  # as in Prediction
    dropped: int = 0
    short: int = 0


@dataclass(frozen=True)
class Prepared:
    """A batch of queries ready for the LM (`Engine.prepare`): demonstrations and prompts."""

    selections: list[Selection]
    prompts: list[Prompt]
    queries: tuple[str, ...] = ()  # kNN prompting reads the texts themselves


@dataclass(frozen=True)
class Launched:
    """A prepared batch whose label scores are queued on the LM (`Engine.launch`)."""

    prepared: Prepared
    scores: PendingScores | None  # None for kNN prompting alone (nothing queued)


@dataclass
class Engine:
    config: PipelineConfig
    index: ExampleIndex
    embedder: Embedder
    lm: LM
    builder: PromptBuilder
    prefix: Prefix | None = None  # soft prompt + instruction, computed once, shared by all queries
    n_virtual: int = 0  # soft-prompt tokens in the prefix (they count against the budget)
    knn: KnnPrompter | None = None  # kNN prompting's anchors, when config.anchors names them

    @classmethod
    def load(cls, config: PipelineConfig, *, lm: LM | None = None, embedder: Embedder | None = None,
             index: ExampleIndex | None = None) -> "Engine":
        """Load what the config names (resolve.py decides which template, LM and adapter),
        reusing any part passed in."""
        from .index import index_version  # index.py imports faiss: only where an index is loaded
        from .resolve import resolve

        parts = resolve(config, lm=lm, embedder=embedder, index=index)
        engine = cls.from_parts(config, parts.index, parts.embedder, parts.lm, parts.template, parts.soft)
        if config.anchors:
            anchors = Anchors.load(config.anchors, lm=parts.lm, builder=engine.builder, index=parts.index,
                                   index_version=index_version(parts.folder) if index is None else None)
            readout = LinearReadout.load(config.anchors, anchors) if config.anchor_readout is AnchorReadout.LINEAR else None
            engine.use_anchors(anchors, readout)
        return engine

    def use_anchors(self, anchors: Anchors, readout: LinearReadout | None = None) -> None:
        """Label by kNN prompting (alone, or mixed with the demonstrations' label probabilities
        as config.anchor_weight says); with `readout`, its probabilities replace the vote."""
        self.knn = KnnPrompter(self.lm, self.builder, anchors, self.index, batch_size=self.config.batch_size,
                               readout=readout)

    @classmethod
    def from_parts(cls, config: PipelineConfig, index: ExampleIndex, embedder: Embedder, lm: LM,
                   template: Template, soft: SoftPrompt | None = None) -> "Engine":
        """An engine over objects already in memory (an index built on the fly, a tiny LM)."""
        engine = cls(config, index, embedder, lm, PromptBuilder(template, lm.tokenizer, labels=index.labels))
        # The tokens every prompt starts with (bos + instruction), after the soft prompt if any,
        # go through the LM once; each batch reuses their key/value cache.
        shared = engine.builder.shared_ids()
        if soft is not None:
            engine.prefix, engine.n_virtual = soft.prefix(lm, ids=shared), soft.n_virtual
        elif shared:
            engine.prefix = compute_prefix(lm, ids=shared)
        return engine

    # ------------------------------------------------------------------ selection + prompts

    @property
    def budget(self) -> int:
        return self.config.budget or self.lm.context_length

    @property
    def _answer_tokens(self) -> int | None:
        # generation must leave room for the output; classification for the longest label
        return self.config.max_new_tokens if self.index.kind is TaskKind.GENERATION else None

    def select(self, queries: Sequence[str], *, method=None, k=None, exclude_ids=None,
               query_ids: Sequence[Sequence[int]] | None = None) -> list[Selection]:
        """Demonstrations for each query; `query_ids` (`builder.query_ids_many(queries)`) saves
        tokenizing the queries again when the caller has them."""
        method = SelectionMethod(method or self.config.method)
        k = self.config.k if k is None else k
        qv = self.embedder.encode(list(queries))  # [q, d]
        qids = self.builder.query_ids_many(queries) if query_ids is None else query_ids
        budget, answer, reserved = self.budget, self._answer_tokens, self.builder.reserved
        budgets = [budget - reserved(q, self.n_virtual, answer_tokens=answer, query_ids=i) for q, i in zip(queries, qids)]
        return select_many(
            self.index, qv, method=method, k=k, budgets=budgets, query_texts=list(queries),
            exclude_ids=exclude_ids, demo_lengths=self.builder.demo_lengths(self.index.records),
            seed=self.config.seed, mmr_lambda=self.config.mmr_lambda, order=self.config.order,
        )

    def _prompts(self, queries: Sequence[str], selections: Sequence[Selection],
                 query_ids: Sequence[Sequence[int]] | None = None) -> list[Prompt]:
        recs = self.index.records
        qids = self.builder.query_ids_many(queries) if query_ids is None else query_ids
        budget, answer, assemble = self.budget - self.n_virtual, self._answer_tokens, self.builder.assemble
        return [assemble([recs[i] for i in sel.ids.tolist()], q, budget=budget, answer_tokens=answer, query_ids=i)
                for q, sel, i in zip(queries, selections, qids)]

    def _demos(self, sel: Selection) -> list[Demo]:
        recs = self.index.records
        return [Demo(recs[i].id, s, recs[i].input, recs[i].output)
                for i, s in zip(sel.ids.tolist(), sel.scores.tolist())]

    def _skipped(self, sel: Selection) -> tuple[str, ...]:
        return tuple(self.index.records[i].id for i in sel.skipped)

    def _launch_scores(self, prompts: Sequence[Prompt]) -> PendingScores:
        labels = [self.builder.label_ids(lab) for lab in self.index.labels]
        # the shared tokens are already in the cached prefix
        ids = [p.ids[p.shared_len:] if self.prefix is not None else p.ids for p in prompts]
        return launch_scores(self.lm, ids, labels, prefix=self.prefix, batch_size=self.config.batch_size)

    def _score(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """log p(label | prompt) for every label: float64 [q, L]."""
        return self._launch_scores(prompts).result()

    # ------------------------------------------------------------------ tasks

    def classify(self, queries: Sequence[str], *, method=None, k=None, exclude_ids=None) -> list[Prediction]:
        return self.finish(self.prepare(queries, method=method, k=k, exclude_ids=exclude_ids))

    def prepare(self, queries: Sequence[str], *, method=None, k=None, exclude_ids=None) -> Prepared:
        """The CPU half of `classify`: embed, select, assemble. On a GPU a caller may prepare the
        next batch while the LM scores this one (`launch`, then `collect`)."""
        if self.index.kind is not TaskKind.CLASSIFICATION:
            raise ValueError(f"index {self.config.index!r} holds {self.index.kind.value} data; use generate")
        if self.knn is not None and self.config.anchor_weight >= 1.0:  # kNN prompting alone: no demonstrations
            return Prepared([], [], tuple(queries))
        qids = self.builder.query_ids_many(queries)  # each query tokenized once, in one call
        selections = self.select(queries, method=method, k=k, exclude_ids=exclude_ids, query_ids=qids)
        return Prepared(selections, self._prompts(queries, selections, qids), tuple(queries))

    def finish(self, prepared: Prepared) -> list[Prediction]:
        """The LM half of `classify`: score every label, calibrate, one Prediction per query."""
        return self.collect(self.launch(prepared))

    def launch(self, prepared: Prepared) -> Launched:
        """Queue the scoring of every label; on a GPU this returns before the LM has finished."""
        if self.knn is not None and self.config.anchor_weight >= 1.0:
            return Launched(prepared, None)
        return Launched(prepared, self._launch_scores(prepared.prompts))

    def collect(self, launched: Launched) -> list[Prediction]:
        """Wait for a launched batch's scores; calibrate; one Prediction per query."""
        prepared = launched.prepared
        if launched.scores is None:
            return self._knn_classify(prepared.queries)
        selections, prompts = prepared.selections, prepared.prompts
        log_scores = launched.scores.result()  # [q, L]
        cal = self.config.calibration
        if cal is Calibration.CONTEXTUAL:
            log_probs = contextual_calibrate(log_scores, np.log(self.content_free_probs(selections)))
        elif cal is Calibration.PMI:
            log_probs = normalize(pmi(log_scores, self.premise_log_scores()))
        else:
            log_probs = normalize(log_scores)
        labels = self.index.labels
        probs = np.exp(log_probs)  # [q, L]
        if self.knn is not None:  # a mixture: anchor_weight on the anchors' votes
            w = self.config.anchor_weight
            probs = (1 - w) * probs + w * self.knn.predict(prepared.queries, self.config.anchor_k)[0]
        best = np.argmax(probs, axis=1).tolist()  # [q]
        # plain Python floats in one call per array, not one float() per element
        return [
            Prediction(
                label=labels[b],
                probs=dict(zip(labels, p)),
                log_scores=raw,
                demos=self._demos(sel),
                prompt_tokens=len(pr.ids) + self.n_virtual,
                skipped=self._skipped(sel),
                dropped=sel.dropped,
                short=sel.short,
            )
            for b, p, raw, sel, pr in zip(best, probs.tolist(), log_scores.tolist(), selections, prompts)
        ]

    def _knn_classify(self, queries: Sequence[str]) -> list[Prediction]:
        """kNN prompting alone: the label shares of the nearest anchors; the anchors that voted
        are shown as the demonstrations (score = -KL distance), the prompt is context + query."""
        probs, nearest, dist, tokens = self.knn.predict(queries, self.config.anchor_k, detail=True)
        recs, labels = self.index.records, self.index.labels
        return [
            Prediction(label=labels[int(np.argmax(p))], probs={lab: float(x) for lab, x in zip(labels, p)},
                       demos=[Demo(recs[i].id, -float(d), recs[i].input, recs[i].output) for i, d in zip(rows, ds)],
                       prompt_tokens=n, log_scores=[float(x) for x in np.log(np.clip(p, 1e-12, None))])
            for p, rows, ds, n in zip(probs, nearest, dist, tokens)
        ]

    def content_free_probs(self, selections: Sequence[Selection]) -> np.ndarray:
        """Contextual calibration's reference (Zhao et al. 2021): label probabilities for the
        content-free inputs with the SAME demonstrations, averaged. float64 [q, L]."""
        n = len(selections)
        return np.mean([np.exp(normalize(self._score(self._prompts([c] * n, selections)))) for c in CONTENT_FREE],
                       axis=0)

    def premise_log_scores(self) -> np.ndarray:
        """Domain-conditional PMI's reference (Holtzman et al. 2021): log p(label | the answer
        prefix with no input and no demonstrations). float64 [1, L]."""
        return self._score(self._prompts([""], [Selection.empty()]))

    def generate(self, inputs: Sequence[str], *, method=None, k=None, exclude_ids=None,
                 max_new_tokens: int | None = None, **sampling) -> list[Generation]:
        qids = self.builder.query_ids_many(inputs)
        selections = self.select(inputs, method=method, k=k, exclude_ids=exclude_ids, query_ids=qids)
        prompts = self._prompts(inputs, selections, qids)
        ids = [p.ids[p.shared_len:] if self.prefix is not None else p.ids for p in prompts]
        texts = generate(
            self.lm, ids, prefix=self.prefix, batch_size=self.config.batch_size,
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            stop=(self.builder.template.separator,), seed=self.config.seed, **sampling,
        )
        return [Generation(t.strip(), self._demos(s), len(p.ids) + self.n_virtual, self._skipped(s), s.dropped,
                           s.short) for t, s, p in zip(texts, selections, prompts)]


    def generate_stream(self, input: str, on_text: Callable[[str], None], *, method=None, k=None,
                        max_new_tokens: int | None = None, **sampling) -> Generation:
        """`generate` for one input, telling `on_text` each piece of the output as it is decoded
        (generate.generate_stream); the pieces join to the returned Generation's text before its
        surrounding whitespace is stripped."""
        [sel] = self.select([input], method=method, k=k)
        [prompt] = self._prompts([input], [sel])
        ids = prompt.ids[prompt.shared_len:] if self.prefix is not None else prompt.ids
        text = generate_stream(
            self.lm, ids, on_text=on_text, prefix=self.prefix,
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            stop=(self.builder.template.separator,), seed=self.config.seed, **sampling,
        )
        return Generation(text.strip(), self._demos(sel), len(prompt.ids) + self.n_virtual, self._skipped(sel),
                          sel.dropped, sel.short)
