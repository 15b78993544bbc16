"""Choosing, on a validation split of an index's own data, how the frozen LM answers the index's
queries, then fitting the winner on all of the index (docs/approximation.md is the protocol).

    chosen = select(index, lm, embedder, template, FitSettings(validation=500), work=Path("fit-work"))
    fit = refit(index, lm, embedder, template, chosen.best, seed=0, out=Path("fit"), work=...)

`select` carves a seeded validation split V out of the index, fits every candidate setting on the
rest P' (its demonstrations, anchors, readouts and soft prompts come from P' alone) and scores it
on V (accuracy; ROUGE-L for generation). Every candidate's answers on V are kept in `work`, so an
interrupted run resumes. `refit` fits the chosen setting again on every record and writes what the
engine needs (fits.py reads it): the query options, and the anchors and readout or the soft
prompt. Nothing here reads a test file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.atomic import publish_dir, write_json
from ..core.choices import Calibration, SelectionMethod, SoftPromptMethod
from ..core.config import EngineSpec, QueryOptions
from ..core.data import Dataset, TaskKind, group_references
from ..core.evaluate import evaluate
from ..core.index import ExampleIndex, IndexConfig
from ..core.knn_prompt import AnchorConfig, Anchors, build_anchors, kl_to_anchors, vote
from ..core.metrics import rouge_l
from ..core.pipeline import Engine
from ..core.prompt import Template
from ..core.readout import fit_readout
from ..core.score import calibrate
from .loop import TrainSettings
from .soft_prompt import SoftPromptConfig, train_soft_prompt

__all__ = ["FitSettings", "Setting", "Selection", "select", "refit", "trained_parameters", "CANDIDATES"]

CANDIDATES = ("icl", "knn_prompting", "readout", "readout_ref", "icl+readout", "ipt")
GENERATION_CANDIDATES = ("icl", "ipt")
FIT_FILE = "fit.json"


@dataclass(frozen=True)
class Setting:
    """One row of a candidate's grid."""

    candidate: str
    params: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        return " ".join([self.candidate, *(f"{k}={v}" for k, v in self.params)])

    def get(self, key: str, default=None):
        return dict(self.params).get(key, default)


@dataclass
class FitSettings:
    validation: int = 500  # records held out (generation: distinct inputs)
    seed: int = 0  # the validation split, the anchors' context, the soft prompt's run
    ks: tuple[int, ...] = (4, 8, 16)
    generation_ks: tuple[int, ...] = (2, 4, 8)
    calibrations: tuple[str, ...] = ("none", "pmi")
    anchor_ks: tuple[int, ...] = (8, 32, 128)
    weights: tuple[float, ...] = (0.25, 0.5, 0.75)  # the readout's share in icl+readout
    ipt: dict = field(default_factory=lambda: {"k": 4, "n_virtual": 20, "steps": 200})
    candidates: tuple[str, ...] | None = None  # None: every candidate of the task kind
    batch_size: int = 8


@dataclass
class Selection:
    table: list[dict]  # one row per setting: name, candidate, params, score, trained, labelled
    best: Setting
    validation_ids: list[str]
    metric: str


# ----------------------------------------------------------------------------- the split


def split(index: ExampleIndex, n: int, seed: int) -> tuple[list[int], list[int]]:
    """(P' rows, V rows): `n` records (generation: distinct inputs, with all their records) drawn by seed."""
    if index.kind is TaskKind.GENERATION:
        inputs = list(dict.fromkeys(r.input for r in index.records))
        held = set(random.Random(seed).sample(inputs, min(n, len(inputs) - 1)))
        v = [i for i, r in enumerate(index.records) if r.input in held]
    else:
        v = sorted(random.Random(seed).sample(range(len(index)), min(n, len(index) - 2)))
    held_rows = set(v)
    return [i for i in range(len(index)) if i not in held_rows], v


def sub_index(index: ExampleIndex, rows: list[int]) -> ExampleIndex:
    """The index restricted to `rows` (an exact flat index over the same vectors)."""
    ds = Dataset(f"{index.manifest.get('dataset', 'index')}[fit]", index.kind,
                 tuple(index.records[i] for i in rows), index.labels)
    return ExampleIndex.from_vectors(ds, np.asarray(index.vectors)[rows], index.manifest["embedder"], IndexConfig())


def trained_parameters(setting: Setting, n_features: int, n_labels: int, hidden: int) -> int:
    """What a setting fits: a readout's weights [n_features, L] and biases [L] (n_features: the
    anchors' S + 1 bins), a soft prompt's vectors [n_virtual, hidden], or nothing."""
    if setting.candidate in ("readout", "readout_ref", "icl+readout"):
        return (n_features + 1) * n_labels
    if setting.candidate == "ipt":
        return int(setting.get("n_virtual")) * hidden
    return 0


# ----------------------------------------------------------------------------- selection


class _Cache:
    """Each setting's answers on V, one JSON file a setting under `work/validation/`."""

    def __init__(self, work: Path, fingerprint: dict):
        self.folder, self.fingerprint = work / "validation", fingerprint

    def get(self, s: Setting, compute: Callable[[], dict]) -> dict:
        path = self.folder / f"{s.name.replace(' ', '_').replace('=', '-').replace('+', 'and')}.json"
        if path.is_file():
            got = json.loads(path.read_text())
            if got.get("fingerprint") == self.fingerprint:
                return got
        out = {**compute(), "setting": s.name, "fingerprint": self.fingerprint}
        write_json(path, out)
        return out


def select(index: ExampleIndex, lm, embedder, template: Template, settings: FitSettings, *, work: Path,
           reference_labels: Callable[[], list[str]] | None = None, progress: bool = True) -> Selection:
    """Every candidate setting fitted on P' and scored on V; the best wins (ties: fewer trained
    parameters, then the earlier setting). `reference_labels()`: the reference's label for every
    index record (readout_ref is skipped without it)."""
    pool_rows, v_rows = split(index, settings.validation, settings.seed)
    pool, held = sub_index(index, pool_rows), [index.records[i] for i in v_rows]
    fingerprint = {"index": index.manifest["dataset_sha256"], "lm": lm.name, "template": template.to_dict(),
                   "validation": settings.validation, "seed": settings.seed}
    cache = _Cache(work, fingerprint)
    kinds = GENERATION_CANDIDATES if index.kind is TaskKind.GENERATION else CANDIDATES
    wanted = [c for c in (settings.candidates or kinds) if c in kinds]
    engine = Engine.from_parts(EngineSpec(index="fit-pool", lm=lm.name), pool, embedder, lm, template)
    ctx = _Context(index, pool_rows, v_rows, pool, held, engine, template, settings, work, reference_labels, progress)
    results: dict[Setting, dict] = {}
    for candidate in wanted:
        for s in _grid(candidate, settings, results, ctx):
            results[s] = cache.get(s, lambda s=s: _answer(s, ctx, results))
    table = [_row(s, r, ctx) for s, r in results.items()]
    best = max(results, key=lambda s: (results[s]["score"], -_row(s, results[s], ctx)["trained"],
                                       -list(results).index(s)))
    metric = "rouge_l" if index.kind is TaskKind.GENERATION else "accuracy"
    return Selection(table, best, [index.records[i].id for i in v_rows], metric)


@dataclass
class _Context:
    index: ExampleIndex
    pool_rows: list[int]
    v_rows: list[int]
    pool: ExampleIndex
    held: list
    engine: Engine
    template: Template
    settings: FitSettings
    work: Path
    reference_labels: Callable[[], list[str]] | None
    progress: bool
    _anchors: Anchors | None = None

    def anchors(self) -> Anchors:
        """Every index record's features, the context drawn from P' (V never shows in it)."""
        if self._anchors is None:
            folder = self.work / f"anchors-seed{self.settings.seed}"
            config = AnchorConfig(seed=self.settings.seed)
            builder = self.engine.builder
            try:
                self._anchors = Anchors.load(folder, lm=self.engine.lm, builder=builder, index=self.index)
            except ValueError:
                self._anchors = build_anchors(self.engine.lm, builder, self.index, config,
                                              context_pool=self.pool.records, index_version=self.index.version)
                self._anchors.save(folder, replace=True)
        return self._anchors


def _grid(candidate: str, settings: FitSettings, results: dict, ctx: _Context) -> list[Setting]:
    if candidate == "icl":
        ks = settings.generation_ks if ctx.index.kind is TaskKind.GENERATION else settings.ks
        cals = ("none",) if ctx.index.kind is TaskKind.GENERATION else settings.calibrations
        return [Setting("icl", (("k", k), ("calibration", c))) for k in ks for c in cals]
    if candidate == "knn_prompting":
        return [Setting("knn_prompting", (("anchor_k", k),)) for k in settings.anchor_ks]
    if candidate in ("readout", "readout_ref"):
        return [] if candidate == "readout_ref" and ctx.reference_labels is None else [Setting(candidate)]
    if candidate == "icl+readout":
        icl = [s for s in results if s.candidate == "icl"]
        readouts = [s for s in results if s.candidate in ("readout", "readout_ref")]
        if not icl or not readouts:
            return []
        best = max(icl, key=lambda s: results[s]["score"])
        return [Setting("icl+readout", best.params + (("readout", r.candidate), ("weight", w)))
                for r in readouts for w in settings.weights]
    if candidate == "ipt":
        return [Setting("ipt", tuple(sorted(settings.ipt.items())))]
    raise ValueError(f"unknown candidate {candidate!r} (choose from {', '.join(CANDIDATES)})")


def _answer(s: Setting, ctx: _Context, results: dict) -> dict:
    """A setting's answers on V: predictions, label probabilities (classification) and its score."""
    if ctx.index.kind is TaskKind.GENERATION:
        return _generation_answers(s, ctx)
    if s.candidate == "icl":
        probs = _icl_probs(ctx, k=s.get("k"), calibration=s.get("calibration"))
    elif s.candidate == "knn_prompting":
        probs = _vote_probs(ctx, s.get("anchor_k"))
    elif s.candidate in ("readout", "readout_ref"):
        probs = _readout_probs(ctx, s.candidate)
    elif s.candidate == "icl+readout":
        icl = np.asarray(results[Setting("icl", s.params[:2])]["probs"])
        readout = np.asarray(results[Setting(s.get("readout"))]["probs"])
        probs = (1 - s.get("weight")) * icl + s.get("weight") * readout
    else:  # ipt
        probs = _ipt_probs(ctx, s)
    labels = ctx.index.labels
    pred = [labels[int(i)] for i in np.argmax(probs, 1)]
    gold = [r.output for r in ctx.held]
    return {"pred": pred, "probs": np.asarray(probs).tolist(),
            "score": float(np.mean([p == g for p, g in zip(pred, gold)]))}


def _icl_probs(ctx: _Context, *, k: int, calibration: str, engine: Engine | None = None) -> np.ndarray:
    """kNN-k ICL's label probabilities on V [v, L]: one LM pass, calibrated afterwards (PMI reads
    the premise's scores, computed once)."""
    engine = engine or ctx.engine
    o = QueryOptions(method=SelectionMethod.KNN, k=k, batch_size=ctx.settings.batch_size)
    texts = [r.input for r in ctx.held]
    log_scores = np.array([p.log_scores for p in _classify(engine, texts, o, ctx.progress, f"fit: icl k={k}")])
    ref = engine.premise_log_scores(o) if calibration == Calibration.PMI.value else None
    return np.exp(calibrate(calibration, log_scores, ref))


def _classify(engine: Engine, texts: list[str], options: QueryOptions, progress: bool, desc: str) -> list:
    from ..core.progress import Progress

    out = []
    with Progress(len(texts), desc, unit="queries", enabled=progress) as bar:
        for i in range(0, len(texts), 64):
            out += engine.classify(texts[i:i + 64], options)
            bar.update(len(texts[i:i + 64]))
    return out


def _vote_probs(ctx: _Context, anchor_k: int) -> np.ndarray:
    a = ctx.anchors()
    p = np.exp(a.logp[ctx.pool_rows].astype(np.float64))  # [n', S+1]
    d = kl_to_anchors(p, (p * a.logp[ctx.pool_rows]).sum(1), a.logp[ctx.v_rows])  # [v, n']
    nearest = np.argsort(d, axis=1, kind="stable")[:, :anchor_k]
    return vote(a.labels[ctx.pool_rows][nearest], len(a.label_names))


def _readout_probs(ctx: _Context, candidate: str) -> np.ndarray:
    a = ctx.anchors()
    sub = replace(a, logp=a.logp[ctx.pool_rows], labels=a.labels[ctx.pool_rows],
                  ids=tuple(a.ids[i] for i in ctx.pool_rows))
    labels = None
    if candidate == "readout_ref":
        ref = ctx.reference_labels()
        labels = np.array([a.label_names.index(ref[i]) for i in ctx.pool_rows])
    return fit_readout(sub, labels, label_source="reference" if labels is not None else "gold").predict(
        a.logp[ctx.v_rows])


def _ipt_probs(ctx: _Context, s: Setting) -> np.ndarray:
    folder = _train_ipt(ctx.engine.lm, ctx.pool, ctx.engine.builder, s, ctx.settings.seed,
                        ctx.work / f"ipt-seed{ctx.settings.seed}")
    engine = ipt_engine(ctx.pool, ctx.engine, folder)
    o = QueryOptions(method=SelectionMethod.KNN, k=s.get("k"), batch_size=ctx.settings.batch_size)
    return np.array([list(p.probs.values()) for p in _classify(engine, [r.input for r in ctx.held], o, ctx.progress,
                                                                "fit: ipt")])


def _train_ipt(lm, pool: ExampleIndex, builder, s: Setting, seed: int, out: Path) -> Path:
    """An IPT soft prompt trained on `pool` (its demonstrations from the pool too); reused when there."""
    if (out / "icl_soft_prompt.json").is_file():
        return out
    cfg = SoftPromptConfig(method=SoftPromptMethod.IPT, n_virtual=s.get("n_virtual"), k=s.get("k"),
                           train=TrainSettings(max_steps=s.get("steps"), seed=seed))
    return train_soft_prompt(lm, pool.dataset, cfg, builder=builder, index=pool, out=out,
                             resume=(out / "checkpoint").is_dir()).out


def ipt_engine(index: ExampleIndex, like: Engine, soft_prompt: Path) -> Engine:
    from ..core.adapters import load_soft_prompt

    return Engine.from_parts(EngineSpec(index="fit", lm=like.lm.name, soft_prompt=str(soft_prompt)), index,
                             like.embedder, like.lm, like.builder.template, load_soft_prompt(soft_prompt))


def _generation_answers(s: Setting, ctx: _Context) -> dict:
    test = Dataset("validation", TaskKind.GENERATION, tuple(ctx.held), ())
    if s.candidate == "icl":
        engine, o = ctx.engine, QueryOptions(k=s.get("k"), batch_size=ctx.settings.batch_size)
    else:
        folder = _train_ipt(ctx.engine.lm, ctx.pool, ctx.engine.builder, s, ctx.settings.seed,
                            ctx.work / f"ipt-seed{ctx.settings.seed}")
        engine, o = ipt_engine(ctx.pool, ctx.engine, folder), QueryOptions(k=s.get("k"), batch_size=ctx.settings.batch_size)
    r = evaluate(engine, test, o, progress=ctx.progress)
    return {"pred": [p["output"] for p in r["predictions"]], "score": r["rouge_l"] / 100.0}


def _row(s: Setting, result: dict, ctx: _Context) -> dict:
    n_labels = max(1, len(ctx.index.labels))
    features = ctx.anchors().logp.shape[1] if s.candidate in ("readout", "readout_ref", "icl+readout") else 0
    hidden = ctx.engine.lm.model.get_input_embeddings().embedding_dim
    labelled = {"readout_ref": 0}.get(s.candidate, len(ctx.pool_rows))
    return {"name": s.name, "candidate": s.candidate, "params": dict(s.params), "score": result["score"],
            "trained": trained_parameters(s, features, n_labels, hidden), "labelled": labelled}


# ----------------------------------------------------------------------------- refit on the whole index


def options_of(s: Setting, batch_size: int = 8) -> QueryOptions:
    """The query options a setting answers with (the engine adds the fit's anchors or soft prompt)."""
    if s.candidate == "icl":
        return QueryOptions(method=SelectionMethod.KNN, k=s.get("k"), calibration=s.get("calibration", "none"),
                            batch_size=batch_size)
    if s.candidate == "knn_prompting":  # (the method is moot: no demonstrations are selected)
        return QueryOptions(method=SelectionMethod.KNN, anchor_k=s.get("anchor_k"), anchor_weight=1.0,
                            batch_size=batch_size)
    if s.candidate in ("readout", "readout_ref"):
        return QueryOptions(method=SelectionMethod.KNN, anchor_weight=1.0, anchor_readout="linear",
                            batch_size=batch_size)
    if s.candidate == "icl+readout":
        return QueryOptions(method=SelectionMethod.KNN, k=s.get("k"), calibration=s.get("calibration"),
                            anchor_weight=s.get("weight"), anchor_readout="linear", batch_size=batch_size)
    return QueryOptions(method=SelectionMethod.KNN, k=s.get("k"), batch_size=batch_size)


def refit(index: ExampleIndex, lm, embedder, template: Template, setting: Setting, *, seed: int, out: Path,
          work: Path, info: dict, reference_labels: Callable[[], list[str]] | None = None,
          context_pool=None) -> dict:
    """Fit `setting` on every record of `index` and publish it at `out`: fit.json (the options,
    what was trained on how many labelled records, and `info`: the selection's table, the LM,
    template and index version it belongs to) plus `anchors/` (with its readout) or
    `soft_prompt/`. Returns fit.json's content."""
    engine = Engine.from_parts(EngineSpec(index="fit", lm=lm.name), index, embedder, lm, template)
    n_labels = max(1, len(index.labels))
    hidden = lm.model.get_input_embeddings().embedding_dim
    with publish_dir(out, replace=True) as tmp:  # fitting again (another seed, new data) replaces the fit
        features = 0
        if setting.candidate in ("knn_prompting", "readout", "readout_ref", "icl+readout"):
            folder = work / f"anchors-seed{seed}"
            try:
                anchors = Anchors.load(folder, lm=lm, builder=engine.builder, index=index)
            except ValueError:
                anchors = build_anchors(lm, engine.builder, index, AnchorConfig(seed=seed), context_pool=context_pool,
                                        index_version=index.version)
                anchors.save(folder, replace=True)
            anchors.save(tmp / "anchors")
            features = anchors.logp.shape[1]
            if setting.candidate != "knn_prompting":
                source = setting.get("readout", setting.candidate)
                labels = None
                if source == "readout_ref":
                    ref = reference_labels()
                    labels = np.array([anchors.label_names.index(x) for x in ref])
                fit_readout(anchors, labels, label_source="reference" if labels is not None else "gold").save(
                    tmp / "anchors")
        if setting.candidate == "ipt":
            trained = _train_ipt(lm, index, engine.builder, setting, seed, work / f"ipt-full-seed{seed}")
            import shutil

            shutil.copytree(trained, tmp / "soft_prompt")
        uses_ref = setting.candidate == "readout_ref" or setting.get("readout") == "readout_ref"
        fit = {"setting": setting.name, "candidate": setting.candidate, "params": dict(setting.params),
               "options": options_of(setting).to_dict(), "seed": seed,
               "anchors": "anchors" if features else None, "soft_prompt": "soft_prompt" if setting.candidate == "ipt"
               else None, "trained_parameters": trained_parameters(setting, features, n_labels, hidden),
               "labelled_records": 0 if setting.candidate == "readout_ref" else len(index),
               "reference_labels": len(index) if uses_ref else 0, **info}
        write_json(tmp / FIT_FILE, fit)
    return fit


def reference_labeller(index: ExampleIndex, reference_lm, embedder, template: Template, path: Path,
                       batch_size: int = 8, progress: bool = True) -> Callable[[], list[str]]:
    """A function giving the reference's zero-shot label for every index record, computed once
    into `path` (JSON) and read from there after."""
    def labels() -> list[str]:
        if path.is_file():
            got = json.loads(path.read_text())
            if got.get("ids") == [r.id for r in index.records]:
                return got["labels"]
        engine = Engine.from_parts(EngineSpec(index="fit", lm=reference_lm.name), index, embedder, reference_lm,
                                   template)
        o = QueryOptions(method=SelectionMethod.ZERO, k=0, batch_size=batch_size)
        preds = _classify(engine, [r.input for r in index.records], o, progress, "reference labels")
        out = [p.label for p in preds]
        write_json(path, {"ids": [r.id for r in index.records], "labels": out})
        return out
    return labels


def score_on(test: Dataset, preds: list[str]) -> float:
    """Accuracy, or for generation ROUGE-L / 100 against all references of an input."""
    if test.kind is TaskKind.GENERATION:
        groups = group_references(test.records)
        return rouge_l(preds, [refs for _, refs in groups]) / 100.0
    return float(np.mean([p == r.output for p, r in zip(preds, test.records)]))
