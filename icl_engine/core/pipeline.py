"""The whole flow of one batch of queries: embed -> select -> assemble -> score (or generate).

    engine = Engine.load(EngineSpec(index="rt"))                       # LM, embedder, index: once
    [pred] = engine.classify(["a tender, funny film"], QueryOptions(k=8))   # label, probs, demonstrations

An Engine holds what is loaded (engines.py keeps one per EngineSpec); every call says what it
asks (QueryOptions), one set for the whole batch or one per query. Queries with different
options are selected and calibrated apart but scored in ONE pass of the LM, so a service can
batch a k = 4 request with a k = 8 one (queries with `scoring="cached"` take a second pass, over
the index's KV cache: kvcache.py). Every stage lives in its own module; this file wires them
together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .adapters import SoftPrompt, load_soft_prompt
from .choices import AnchorReadout, Calibration, Scoring, SelectionMethod
from .config import EngineSpec, PipelineConfig, QueryOptions
from .data import TaskKind
from .embed import Embedder
from .fits import Fit, read_fit
from .generate import generate, generate_stream
from .knn_prompt import Anchors, KnnPrompter
from .kvcache import KVCache, KVCacheError, kv_folder, score_cached
from .lm import LM
from .prompt import Prompt, PromptBuilder, PromptTooLong, Template
from .readout import LinearReadout, has_readout
from .results import Demo, Generation, GenerationDemo, Prediction
from .score import PendingScores, Prefix, calibrate, compute_prefix, launch_scores
from .select import Selection, select_many

if TYPE_CHECKING:  # faiss (index.py) is needed to load an index, not to run an engine over one in memory
    from .index import ExampleIndex

__all__ = ["Engine", "EngineSpec", "QueryOptions", "PipelineConfig", "Prediction", "Generation", "Demo", "Prepared",
           "Launched", "Options"]

CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021
Options = QueryOptions | Sequence[QueryOptions] | None  # one set for every query, or one per query


@dataclass(frozen=True)
class Prepared:
    """A batch of queries ready for the LM (`Engine.prepare`): per query its options, its
    demonstrations and its prompt (None where kNN prompting alone answers: nothing to score)."""

    queries: tuple[str, ...]
    options: tuple[QueryOptions, ...]
    selections: tuple[Selection | None, ...]
    prompts: tuple[Prompt | None, ...]


@dataclass(frozen=True)
class Launched:
    """A prepared batch whose label scores are queued on the LM (`Engine.launch`): one pass per
    prefix the queries use (the engine's own, and the fit's soft prompt)."""

    prepared: Prepared
    scores: tuple[tuple[list[int], PendingScores], ...]  # (the queries' positions, their [m, L] log-scores)


@dataclass
class Parts:
    """What answers a group of queries: the cached prefix (bos + instruction, after a soft prompt
    if any), the soft prompt's length, and kNN prompting's anchors."""

    prefix: Prefix | None = None
    n_virtual: int = 0
    knn: KnnPrompter | None = None


def groups(options: Sequence[QueryOptions]) -> dict[QueryOptions, list[int]]:
    """Positions of the queries that share each option set, in order of first appearance."""
    out: dict[QueryOptions, list[int]] = {}
    for i, o in enumerate(options):
        out.setdefault(o, []).append(i)
    return out


@dataclass
class Engine:
    """What is loaded for one EngineSpec. `Engine(spec)` loads what the spec names (as
    `Engine.load(spec)`, which also takes parts already loaded); the engine cache
    (engines.ENGINES, `icl_engine.load`) keeps one per spec."""

    spec: EngineSpec
    index: ExampleIndex | None = None
    embedder: Embedder | None = None
    lm: LM | None = None
    builder: PromptBuilder | None = None
    prefix: Prefix | None = None  # soft prompt + instruction, computed once, shared by all queries
    n_virtual: int = 0  # soft-prompt tokens in the prefix (they count against the budget)
    knn: KnnPrompter | None = None  # kNN prompting's anchors (and readout), when spec.anchors names them
    defaults: QueryOptions = QueryOptions()  # the options of a call that gives none
    fit: Fit | None = None  # the index's fit (icl index fit): answers method "auto"
    fit_parts: Parts | None = None
    # cached scoring: the index's KV cache, read by the first query that asks (and again when
    # `icl index cache` publishes a new one); kv_folder None: an index in memory (use_kv_cache)
    kv: KVCache | None = None
    kv_folder: Path | None = None
    index_version: str | None = None

    def __post_init__(self):
        if self.builder is None:  # Engine(spec): load what it names
            self.__dict__.update(type(self).load(self.spec).__dict__)

    @classmethod
    def load(cls, spec: EngineSpec, *, lm: LM | None = None, embedder: Embedder | None = None,
             index: ExampleIndex | None = None, version: str | None = None) -> "Engine":
        """Load what the spec names (resolve.py decides which template, LM and adapter), reusing
        any part passed in. A PipelineConfig's options become the engine's defaults. `version`:
        the index version the caller already read (read here otherwise)."""
        from .index import index_version  # index.py imports faiss: only where an index is loaded
        from .resolve import resolve

        parts = resolve(spec, lm=lm, embedder=embedder, index=index)
        engine = cls.from_parts(spec, parts.index, parts.embedder, parts.lm, parts.template, parts.soft)
        version = version or (index_version(parts.folder) if index is None else None)
        engine.kv_folder, engine.index_version = kv_folder(parts.folder), version
        if spec.anchors:
            anchors = Anchors.load(spec.anchors, lm=parts.lm, builder=engine.builder, index=parts.index,
                                   index_version=version)
            readout = LinearReadout.load(spec.anchors, anchors) if has_readout(spec.anchors) else None
            engine.use_anchors(anchors, readout, folder=spec.anchors)
        elif spec.fit and not spec.soft_prompt:
            version = version or (index.version if index is not None else index_version(parts.folder))
            engine.use_fit(read_fit(parts.folder, version, lm=parts.lm.name, template=parts.template.to_dict()),
                           version)
        return engine

    def use_fit(self, fit: Fit | None, version: str | None) -> None:
        """Answer method "auto" with `fit` (read_fit; None: no fit, auto means knn)."""
        self.fit, self.fit_parts = fit, None
        if fit is None:
            return
        parts = Parts(self.prefix, self.n_virtual)
        if fit.info.get("anchors"):
            folder = fit.folder / fit.info["anchors"]
            anchors = Anchors.load(folder, lm=self.lm, builder=self.builder, index=self.index, index_version=version)
            readout = LinearReadout.load(folder, anchors) if has_readout(folder) else None
            parts.knn = KnnPrompter(self.lm, self.builder, anchors, self.index, readout=readout, folder=folder)
        if fit.info.get("soft_prompt"):
            soft = load_soft_prompt(fit.folder / fit.info["soft_prompt"])
            parts.prefix, parts.n_virtual = soft.prefix(self.lm, ids=self.builder.shared_ids()), soft.n_virtual
        self.fit_parts = parts

    @classmethod
    def from_parts(cls, spec: EngineSpec, index: ExampleIndex, embedder: Embedder, lm: LM, template: Template,
                   soft: SoftPrompt | None = None, *, defaults: QueryOptions | None = None) -> "Engine":
        """An engine over objects already in memory (an index built on the fly, a tiny LM). Its
        default options: `defaults`, else a PipelineConfig's own, else QueryOptions()."""
        defaults = defaults or (spec.options if isinstance(spec, QueryOptions) else QueryOptions())
        engine = cls(spec.spec, index, embedder, lm, PromptBuilder(template, lm.tokenizer, labels=index.labels),
                     defaults=defaults)
        # The tokens every prompt starts with (bos + instruction), after the soft prompt if any,
        # go through the LM once; each batch reuses their key/value cache.
        shared = engine.builder.shared_ids()
        if soft is not None:
            engine.prefix, engine.n_virtual = soft.prefix(lm, ids=shared), soft.n_virtual
        elif shared:
            engine.prefix = compute_prefix(lm, ids=shared)
        return engine

    def use_anchors(self, anchors: Anchors, readout: LinearReadout | None = None, *, folder=None) -> None:
        """Label by kNN prompting (alone, or mixed with the demonstrations' label probabilities
        as a query's anchor_weight says); `readout`, when given, answers queries that ask for it."""
        self.knn = KnnPrompter(self.lm, self.builder, anchors, self.index, readout=readout, folder=folder)

    def use_kv_cache(self, cache: KVCache) -> None:
        """Answer cached-scoring queries from `cache` (an engine over an index in memory; one
        loaded from an index folder reads the index's own cache)."""
        self.kv, self.kv_folder = cache, None

    def kv_cache(self) -> KVCache:
        """The KV cache cached scoring reads: the index's current one, loaded when first asked
        for and again when a new one has been published."""
        if self.spec.soft_prompt is not None:
            raise KVCacheError("cached scoring cannot be used with a soft prompt (the cached demonstrations were "
                               "computed without it); use --scoring exact")
        if self.kv_folder is not None:
            from .index import store  # (faiss: an index folder was loaded, so it is there)

            if self.kv is None or self.kv.version != store.read_pointer(self.kv_folder):
                self.kv = KVCache.load(self.kv_folder, lm=self.lm, builder=self.builder, index=self.index,
                                       index_version=self.index_version, name=self.spec.index)
        elif self.kv is None:
            raise KVCacheError("this engine's index is in memory and has no KV cache (give it one with use_kv_cache)")
        return self.kv

    def options(self, options: Options, n: int, overrides: dict | None = None) -> tuple[QueryOptions, ...]:
        """One QueryOptions per query: `options` (one set, one per query, or None for the
        defaults) with `overrides` (QueryOptions fields) applied to each."""
        if options is None or isinstance(options, QueryOptions):
            per = [(options or self.defaults).options] * n
        else:
            per = [o.options for o in options]
            if len(per) != n:
                raise ValueError(f"{len(per)} option sets for {n} queries")
        if overrides:
            per = [dataclasses.replace(o, **{k: v for k, v in overrides.items() if v is not None}) for o in per]
        return tuple(self.resolve(o) for o in per)

    def resolve(self, o: QueryOptions) -> QueryOptions:
        """Method "auto": the fit's options (the whole setting it chose) when the index has a fit,
        else kNN with the query's other options."""
        if o.method is not SelectionMethod.AUTO:
            return o
        if self.fit is not None:
            return self.fit.options
        return dataclasses.replace(o, method=SelectionMethod.KNN)

    def parts(self, o: QueryOptions) -> Parts:
        if o.fitted and self.fit_parts is not None:
            return self.fit_parts
        return Parts(self.prefix, self.n_virtual, self.knn)

    def anchor_weight(self, o: QueryOptions) -> float:
        """The anchors' share for these options: as asked, else 1 with the spec's anchors, else 0."""
        knn = self.parts(o).knn
        if knn is None:
            return 0.0
        return o.anchor_weight if o.anchor_weight is not None else 1.0 if not o.fitted else 0.0

    def describe(self, o: QueryOptions) -> str:
        """What answers a query with these options, in a few words ("knn-8", "fit: readout", ...)."""
        if o.fitted and self.fit is not None:
            return f"fit: {self.fit.name}"
        w = self.anchor_weight(o)
        anchors = f"knn_prompting anchor_k={o.anchor_k}" if o.anchor_readout is AnchorReadout.KNN else "readout"
        if w >= 1.0:
            return anchors
        icl = o.method.value if o.method is SelectionMethod.ZERO else f"{o.method.value}-{o.k}"
        icl += "" if o.calibration is Calibration.NONE else f" {o.calibration.value}"
        return icl if w == 0 else f"{icl} + {anchors} weight={w:g}"

    # ------------------------------------------------------------------ selection + prompts

    def budget(self, options: QueryOptions) -> int:
        return options.budget or self.lm.context_length

    def _answer_tokens(self, options: QueryOptions) -> int | None:
        # generation must leave room for the output; classification for the longest label
        return options.max_new_tokens if self.index.kind is TaskKind.GENERATION else None

    def select(self, queries: Sequence[str], options: QueryOptions | None = None, *, exclude_ids=None,
               query_ids: Sequence[Sequence[int]] | None = None, vectors: np.ndarray | None = None,
               **overrides) -> list[Selection]:
        """Demonstrations for each query, all with one option set; `query_ids`
        (`builder.query_ids_many(queries)`) and `vectors` [q, d] (the queries embedded) save
        that work when the caller has them."""
        [o] = self.options(options, 1, overrides)
        qv = self.embedder.encode(list(queries)) if vectors is None else vectors  # [q, d]
        qids = self.builder.query_ids_many(queries) if query_ids is None else query_ids
        answer, reserved = self._answer_tokens(o), self.builder.reserved
        # cached scoring keeps all k demonstrations whatever their length (kvcache.py: the layout
        # changes when they do not fit); exact scoring packs the budget
        budgets = None if o.scoring is Scoring.CACHED else \
            [self.budget(o) - reserved(q, self.parts(o).n_virtual, answer_tokens=answer, query_ids=i)
             for q, i in zip(queries, qids)]
        return select_many(
            self.index, qv, method=o.method, k=o.k, budgets=budgets, query_texts=list(queries),
            exclude_ids=exclude_ids, demo_lengths=self.builder.demo_lengths(self.index.records),
            seed=o.seed, mmr_lambda=o.mmr_lambda, order=o.order,
        )

    def _prompts(self, queries: Sequence[str], selections: Sequence[Selection], options: QueryOptions,
                 query_ids: Sequence[Sequence[int]] | None = None) -> list[Prompt]:
        recs = self.index.records
        qids = self.builder.query_ids_many(queries) if query_ids is None else query_ids
        budget = self.budget(options) - self.parts(options).n_virtual
        answer, assemble = self._answer_tokens(options), self.builder.assemble
        if options.scoring is Scoring.CACHED:  # no budget on the demonstrations; the query alone must fit
            for q, i in zip(queries, qids):
                alone = self.builder.reserved(q, 0, answer, query_ids=i)
                if alone > budget:
                    raise PromptTooLong(f"the query alone needs {alone} tokens but the budget is {budget}")
            budget = None
        return [assemble([recs[i] for i in sel.ids.tolist()], q, budget=budget, answer_tokens=answer, query_ids=i)
                for q, sel, i in zip(queries, selections, qids)]

    def _demos(self, rows, scores) -> list[Demo] | list[GenerationDemo]:
        recs, kind = self.index.records, Demo if self.index.kind is TaskKind.CLASSIFICATION else GenerationDemo
        return [kind(recs[i].id, float(s), recs[i].input, recs[i].output) for i, s in zip(rows, scores)]

    def _skipped(self, sel: Selection) -> tuple[str, ...]:
        return tuple(self.index.records[i].id for i in sel.skipped)

    def _launch_scores(self, prompts: Sequence[Prompt], options: Sequence[QueryOptions],
                       selections: Sequence[Selection]) -> PendingScores:
        """Queue the label scores of every prompt (each with its options and demonstrations; all
        with one prefix, see launch): the exact ones in one LM pass, the cached ones in another (a
        prompt without demonstrations is scored exactly: cached scoring of it is the same computation)."""
        labels = [self.builder.label_ids(lab) for lab in self.index.labels]
        parts = self.parts(options[0])
        cached = [i for i, (o, s) in enumerate(zip(options, selections))
                  if o.scoring is Scoring.CACHED and len(s)]
        if cached and parts.n_virtual:
            raise KVCacheError("cached scoring cannot be used with a soft prompt (the cached demonstrations were "
                               "run after the instruction alone); use scoring \"exact\"")
        exact = sorted(set(range(len(prompts))) - set(cached))
        pieces = []
        if exact:
            # the shared tokens are already in the cached prefix
            ids = [prompts[i].ids[prompts[i].shared_len:] if parts.prefix is not None else prompts[i].ids
                   for i in exact]
            pieces.append((exact, launch_scores(self.lm, ids, labels, prefix=parts.prefix,
                                                batch_size=options[exact[0]].batch_size)))
        if cached:
            pieces.append((cached, score_cached(
                self.lm, self.kv_cache(), parts.prefix, [prompts[i] for i in cached],
                [selections[i].ids for i in cached], labels,
                budgets=[self.budget(options[i]) - parts.n_virtual for i in cached],
                answer=self.builder.max_answer_len, batch_size=options[cached[0]].batch_size)))
        if not cached:
            return pieces[0][1]
        return PendingScores.join((len(prompts), len(labels)), pieces)

    def _score(self, prompts: Sequence[Prompt], options: QueryOptions, selections: Sequence[Selection]) -> np.ndarray:
        """log p(label | prompt) for every label, all prompts with one option set: float64 [q, L]."""
        return self._launch_scores(prompts, [options] * len(prompts), selections).result()

    def _knn_alone(self, o: QueryOptions) -> bool:
        return self.anchor_weight(o) >= 1.0

    # ------------------------------------------------------------------ classification

    def classify(self, queries: Sequence[str], options: Options = None, *, exclude_ids=None,
                 **overrides) -> list[Prediction]:
        """One Prediction per query. `overrides`: QueryOptions fields for every query (k=4)."""
        return self.finish(self.prepare(queries, options, exclude_ids=exclude_ids, **overrides))

    def prepare(self, queries: Sequence[str], options: Options = None, *, exclude_ids=None,
                **overrides) -> Prepared:
        """The CPU half of `classify`: embed, select, assemble. On a GPU a caller may prepare the
        next batch while the LM scores this one (`launch`, then `collect`)."""
        if self.index.kind is not TaskKind.CLASSIFICATION:
            raise ValueError(f"index {self.spec.index!r} holds {self.index.kind.value} data; use generate")
        opts = self.options(options, len(queries), overrides)
        sels, prompts = [None] * len(queries), [None] * len(queries)
        asked = [i for i, o in enumerate(opts) if not self._knn_alone(o)]  # kNN prompting alone selects nothing
        if asked:
            texts = [queries[i] for i in asked]
            qids = dict(zip(asked, self.builder.query_ids_many(texts)))  # each query tokenized once, in one call
            qv = dict(zip(asked, self.embedder.encode(texts)))  # and embedded once
            for o, rows in groups([opts[i] for i in asked]).items():
                rows = [asked[j] for j in rows]
                sub, ids = [queries[i] for i in rows], [qids[i] for i in rows]
                ex = None if exclude_ids is None else [exclude_ids[i] for i in rows]
                got = self.select(sub, o, exclude_ids=ex, query_ids=ids, vectors=np.stack([qv[i] for i in rows]))
                for i, sel, prompt in zip(rows, got, self._prompts(sub, got, o, ids)):
                    sels[i], prompts[i] = sel, prompt
        return Prepared(tuple(queries), opts, tuple(sels), tuple(prompts))

    def finish(self, prepared: Prepared) -> list[Prediction]:
        """The LM half of `classify`: score every label, calibrate, one Prediction per query."""
        return self.collect(self.launch(prepared))

    def launch(self, prepared: Prepared) -> Launched:
        """Queue the scoring of every label of every prompt, in one LM pass whatever the
        queries' options; on a GPU this returns before the LM has finished."""
        by_prefix: dict[int, list[int]] = {}  # one pass per prefix: the engine's, the fit's soft prompt
        for i, (o, pr) in enumerate(zip(prepared.options, prepared.prompts)):
            if pr is not None:
                by_prefix.setdefault(id(self.parts(o).prefix), []).append(i)
        scores = []
        for rows in by_prefix.values():
            scores.append((rows, self._launch_scores([prepared.prompts[i] for i in rows],
                                                     [prepared.options[i] for i in rows],
                                                     [prepared.selections[i] for i in rows])))
        return Launched(prepared, tuple(scores))

    def collect(self, launched: Launched) -> list[Prediction]:
        """Wait for a launched batch's scores; calibrate each option group; one Prediction per query."""
        p = launched.prepared
        n, labels = len(p.queries), self.index.labels
        log_scores = np.full((n, len(labels)), np.nan)  # [q, L]
        for rows, pending in launched.scores:
            log_scores[rows] = pending.result()
        out: list[Prediction | None] = [None] * n
        for o, rows in groups(p.options).items():
            queries = [p.queries[i] for i in rows]
            if self._knn_alone(o):
                for i, pred in zip(rows, self._knn_classify(queries, o)):
                    out[i] = pred
                continue
            sels = [p.selections[i] for i in rows]
            probs = np.exp(self._calibrated(log_scores[rows], sels, o))  # [r, L]
            w, parts = self.anchor_weight(o), self.parts(o)
            if w > 0:  # a mixture: anchor_weight on the anchors' label shares
                probs = (1 - w) * probs + w * parts.knn.predict(queries, o.anchor_k, readout=self._readout(o))[0]
            for i, pr, raw, sel in zip(rows, probs.tolist(), log_scores[rows].tolist(), sels):
                demos = self._demos(sel.ids.tolist(), sel.scores.tolist())
                out[i] = Prediction(text=p.queries[i], label=labels[int(np.argmax(pr))], probs=dict(zip(labels, pr)),
                                    log_scores=raw, demo_ids=[d.id for d in demos], demos=demos,
                                    prompt_tokens=len(p.prompts[i].ids) + parts.n_virtual, answered_by=self.describe(o),
                                    skipped=self._skipped(sel), dropped=sel.dropped, short=sel.short)
        return out

    def _calibrated(self, log_scores: np.ndarray, selections: Sequence[Selection], o: QueryOptions) -> np.ndarray:
        """Label log-probs [r, L] of one option group after its calibration."""
        if o.calibration is Calibration.CONTEXTUAL:
            return calibrate(o.calibration, log_scores, np.log(self.content_free_probs(selections, o)))
        if o.calibration is Calibration.PMI:
            return calibrate(o.calibration, log_scores, self.premise_log_scores(o))
        return calibrate(o.calibration, log_scores)

    def _readout(self, o: QueryOptions) -> bool:
        return o.anchor_readout is AnchorReadout.LINEAR

    def _knn_classify(self, queries: Sequence[str], o: QueryOptions) -> list[Prediction]:
        """kNN prompting alone: the label shares of the nearest anchors (or the readout's); the
        anchors that voted are shown as the demonstrations (score = -KL distance), the prompt is
        context + query."""
        probs, nearest, dist, tokens = self.parts(o).knn.predict(queries, o.anchor_k, readout=self._readout(o),
                                                                 detail=True)
        labels = self.index.labels
        out = []
        for q, p, rows, ds, n in zip(queries, probs, nearest, dist, tokens):
            demos = self._demos(rows.tolist(), (-ds).tolist())
            out.append(Prediction(text=q, label=labels[int(np.argmax(p))], probs={lab: float(x) for lab, x in zip(labels, p)},
                                  log_scores=[float(x) for x in np.log(np.clip(p, 1e-12, None))],
                                  demo_ids=[d.id for d in demos], demos=demos, prompt_tokens=n,
                                  answered_by=self.describe(o)))
        return out

    def content_free_probs(self, selections: Sequence[Selection], options: QueryOptions | None = None) -> np.ndarray:
        """Contextual calibration's reference (Zhao et al. 2021): label probabilities for the
        content-free inputs with the SAME demonstrations, averaged. float64 [q, L]."""
        o, n = self.resolve(options or self.defaults), len(selections)
        return np.mean([np.exp(calibrate(Calibration.NONE, self._score(self._prompts([c] * n, selections, o), o,
                                                                       selections)))
                        for c in CONTENT_FREE], axis=0)

    def premise_log_scores(self, options: QueryOptions | None = None) -> np.ndarray:
        """Domain-conditional PMI's reference (Holtzman et al. 2021): log p(label | the answer
        prefix with no input and no demonstrations). float64 [1, L]."""
        o = options or self.defaults
        o = self.resolve(o)
        return self._score(self._prompts([""], [Selection.empty()], o), o, [Selection.empty()])

    # ------------------------------------------------------------------ generation

    def generate(self, inputs: Sequence[str], options: Options = None, *, exclude_ids=None,
                 max_new_tokens: int | None = None, **sampling) -> list[Generation]:
        """One Generation per input (greedy unless `sampling` says otherwise: do_sample, top_p, ...)."""
        fields = {f.name for f in dataclasses.fields(QueryOptions)}
        overrides = {k: sampling.pop(k) for k in list(sampling) if k in fields}
        opts = self.options(options, len(inputs), {**overrides, "max_new_tokens": max_new_tokens})
        _exact_only(opts)
        out: list[Generation | None] = [None] * len(inputs)
        for o, rows in groups(opts).items():
            sub = [inputs[i] for i in rows]
            qids = self.builder.query_ids_many(sub)
            ex = None if exclude_ids is None else [exclude_ids[i] for i in rows]
            sels = self.select(sub, o, exclude_ids=ex, query_ids=qids)
            prompts, prefix = self._prompts(sub, sels, o, qids), self.parts(o).prefix
            ids = [p.ids[p.shared_len:] if prefix is not None else p.ids for p in prompts]
            texts = generate(self.lm, ids, prefix=prefix, batch_size=o.batch_size, max_new_tokens=o.max_new_tokens,
                             stop=(self.builder.template.separator,), seed=o.seed, **sampling)
            for i, t, s, p in zip(rows, texts, sels, prompts):
                out[i] = self._generation(inputs[i], t, s, p, o)
        return out

    def generate_stream(self, input: str, on_text: Callable[[str], None], options: QueryOptions | None = None,
                        *, max_new_tokens: int | None = None, **sampling) -> Generation:
        """`generate` for one input, telling `on_text` each piece of the output as it is decoded
        (generate.generate_stream); the pieces join to the returned Generation's text before its
        surrounding whitespace is stripped."""
        [o] = self.options(options, 1, {"max_new_tokens": max_new_tokens})
        _exact_only([o])
        [sel] = self.select([input], o)
        [prompt], prefix = self._prompts([input], [sel], o), self.parts(o).prefix
        ids = prompt.ids[prompt.shared_len:] if prefix is not None else prompt.ids
        text = generate_stream(self.lm, ids, on_text=on_text, prefix=prefix, max_new_tokens=o.max_new_tokens,
                               stop=(self.builder.template.separator,), seed=o.seed, **sampling)
        return self._generation(input, text, sel, prompt, o)

    def _generation(self, input: str, text: str, sel: Selection, prompt: Prompt, o: QueryOptions) -> Generation:
        demos = self._demos(sel.ids.tolist(), sel.scores.tolist())
        return Generation(input, text.strip(), [d.id for d in demos], len(prompt.ids) + self.parts(o).n_virtual,
                          demos, answered_by=self.describe(o), skipped=self._skipped(sel), dropped=sel.dropped,
                          short=sel.short)


def _exact_only(options: Sequence[QueryOptions]) -> None:
    if any(o.scoring is Scoring.CACHED for o in options):
        raise KVCacheError("cached scoring is for classification; generation reads its prompt exactly "
                           "(scoring \"exact\")")
