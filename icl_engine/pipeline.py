"""The whole flow: index -> select -> assemble -> score / generate.

    engine = Engine.load(PipelineConfig(index="rt"))
    [pred] = engine.classify(["a tender, funny film"])      # label, probs, demonstrations

Every stage lives in its own module; this file only wires them together.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from .adapters import load_model, load_soft_prompt
from .data import TaskKind
from .embed import Embedder, get_embedder
from .index import ExampleIndex, index_path
from .lm import DEFAULT_LM, LM, DType
from .prompt import Prompt, PromptBuilder, Template
from .score import Calibration, Prefix, compute_prefix, contextual_calibrate, normalize, pmi, score_continuations
from .generate import generate
from .select import DemoOrder, Selection, SelectionMethod, select_many


__all__ = ["PipelineConfig", "Engine", "Prediction", "Generation", "Demo", "TEMPLATE_FILE", "index_template"]

TEMPLATE_FILE = "template.json"  # optional default template stored beside an index


def index_template(folder: Path | None, kind: TaskKind) -> Template:
    """The template an index folder suggests: its template.json if present, else the task default."""
    stored = folder / TEMPLATE_FILE if folder is not None else None
    return Template.from_json(stored) if stored is not None and stored.is_file() else Template.default(kind)
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021


@dataclass
class PipelineConfig:
    index: str  # name under indexes_dir, or a path to an index folder
    indexes_dir: str | None = None
    lm: str = DEFAULT_LM
    template: Template | None = None  # None: the index's template.json, else the task default
    method: SelectionMethod = SelectionMethod.KNN
    k: int = 8
    budget: int | None = None  # total prompt tokens; None: the LM's context length
    calibration: Calibration = Calibration.NONE
    soft_prompt: str | None = None
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 64
    mmr_lambda: float = 0.5
    order: DemoOrder = DemoOrder.NEAREST_LAST  # where the most similar demonstration goes
    # LM weights' dtype. None: exact float32 on CPU (bf16/fp16 on CUDA). "bfloat16" on a CPU with
    # AMX is several times faster but changes the scores (benchmarks/classify_bench.py reports by how much).
    dtype: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        self.method = SelectionMethod(self.method)
        self.calibration = Calibration(self.calibration)
        self.order = DemoOrder(self.order)
        if isinstance(self.template, dict):
            self.template = Template(**self.template)
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.dtype is not None:
            try:
                self.dtype = DType(self.dtype).value
            except ValueError:
                raise ValueError(f"dtype must be one of {[d.value for d in DType]} or None, got {self.dtype!r}") from None

    def save(self, path: str | Path) -> None:
        d = asdict(self)
        d["method"], d["calibration"], d["order"] = self.method.value, self.calibration.value, self.order.value
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PipelineConfig":
        d = json.loads(Path(path).read_text())
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown pipeline config fields {sorted(unknown)}")
        return cls(**d)


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
    skipped: tuple[str, ...] = ()  # demonstrations too long for the budget
    log_scores: list[float] = field(default_factory=list)  # uncalibrated log p(label | prompt)


@dataclass(frozen=True)
class Generation:
    text: str
    demos: list[Demo]
    prompt_tokens: int


@dataclass
class Engine:
    config: PipelineConfig
    index: ExampleIndex
    embedder: Embedder
    lm: LM
    builder: PromptBuilder
    prefix: Prefix | None = None  # soft prompt + instruction, computed once, shared by all queries
    n_virtual: int = 0  # soft-prompt tokens in the prefix (they count against the budget)

    @classmethod
    def load(cls, config: PipelineConfig, *, lm: LM | None = None, embedder: Embedder | None = None,
             index: ExampleIndex | None = None) -> "Engine":
        folder = index_path(config.index, config.indexes_dir)
        index = index or ExampleIndex.load(folder)
        embedder = embedder or get_embedder(index.manifest["embedder"])
        lm = lm or load_model(config.lm, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
        soft = None
        if config.soft_prompt:
            soft = load_soft_prompt(config.soft_prompt)
        # template: given > the one the soft prompt was trained with > stored with the index > default
        template = (config.template or (soft.template if soft is not None else None)
                    or index_template(folder, index.kind))
        return cls.from_parts(config, index, embedder, lm, template, soft)

    @classmethod
    def from_parts(cls, config: PipelineConfig, index: ExampleIndex, embedder: Embedder, lm: LM,
                   template: Template, soft=None) -> "Engine":
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

    def select(self, queries: Sequence[str], *, method=None, k=None, exclude_ids=None) -> list[Selection]:
        method = SelectionMethod(method or self.config.method)
        k = self.config.k if k is None else k
        qv = self.embedder.encode(list(queries))  # [q, d]
        budgets = [self.budget - self.builder.reserved(q, self.n_virtual, answer_tokens=self._answer_tokens)
                   for q in queries]
        return select_many(
            self.index, qv, method=method, k=k, budgets=budgets, query_texts=list(queries),
            exclude_ids=exclude_ids, demo_lengths=self.builder.demo_lengths(self.index.records),
            seed=self.config.seed, mmr_lambda=self.config.mmr_lambda, order=self.config.order,
        )

    def _prompts(self, queries: Sequence[str], selections: Sequence[Selection]) -> list[Prompt]:
        recs = self.index.records
        return [
            self.builder.assemble([recs[i] for i in sel.ids], q, budget=self.budget - self.n_virtual,
                                  answer_tokens=self._answer_tokens)
            for q, sel in zip(queries, selections)
        ]

    def _demos(self, sel: Selection) -> list[Demo]:
        recs = self.index.records
        return [Demo(recs[i].id, float(s), recs[i].input, recs[i].output) for i, s in zip(sel.ids, sel.scores)]

    def _score(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """log p(label | prompt) for every label: float64 [q, L]."""
        labels = [self.builder.label_ids(lab) for lab in self.index.labels]
        # the shared tokens are already in the cached prefix
        ids = [p.ids[p.shared_len:] if self.prefix is not None else p.ids for p in prompts]
        return score_continuations(self.lm, ids, labels, prefix=self.prefix, batch_size=self.config.batch_size)

    # ------------------------------------------------------------------ tasks

    def classify(self, queries: Sequence[str], *, method=None, k=None, exclude_ids=None) -> list[Prediction]:
        if self.index.kind is not TaskKind.CLASSIFICATION:
            raise ValueError(f"index {self.config.index!r} holds {self.index.kind.value} data; use generate")
        selections = self.select(queries, method=method, k=k, exclude_ids=exclude_ids)
        prompts = self._prompts(queries, selections)
        log_scores = self._score(prompts)  # [q, L]
        cal = self.config.calibration
        if cal is Calibration.CONTEXTUAL:
            log_probs = contextual_calibrate(log_scores, np.log(self.content_free_probs(selections)))
        elif cal is Calibration.PMI:
            log_probs = normalize(pmi(log_scores, self.premise_log_scores()))
        else:
            log_probs = normalize(log_scores)
        probs = np.exp(log_probs)
        labels = self.index.labels
        return [
            Prediction(
                label=labels[int(np.argmax(p))],
                probs={lab: float(x) for lab, x in zip(labels, p)},
                log_scores=[float(x) for x in raw],
                demos=self._demos(sel),
                prompt_tokens=len(pr.ids) + self.n_virtual,
                skipped=tuple(self.index.records[i].id for i in sel.skipped),
            )
            for p, raw, sel, pr in zip(probs, log_scores, selections, prompts)
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
        selections = self.select(inputs, method=method, k=k, exclude_ids=exclude_ids)
        prompts = self._prompts(inputs, selections)
        ids = [p.ids[p.shared_len:] if self.prefix is not None else p.ids for p in prompts]
        texts = generate(
            self.lm, ids, prefix=self.prefix, batch_size=self.config.batch_size,
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            stop=(self.builder.template.separator,), seed=self.config.seed, **sampling,
        )
        return [Generation(t.strip(), self._demos(s), len(p.ids) + self.n_virtual)
                for t, s, p in zip(texts, selections, prompts)]

