"""The studies behind the front ends: the approximation report (how close ICL gets to the
fine-tuned reference) and the sample-size bounds with the experiments that check their shapes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.adapters import load_finetuned
from ..core.choices import DEFAULT_LM
from ..core.index import index_path
from ..core.lm import load_lm
from ..core.prompt import Template
from ..studies import compare as cmp
from ..studies import experiments
from ..studies.bounds import theory_table
from ..studies.experiments.retrieval import engine_predictor

__all__ = ["compare", "bounds_theory", "bounds_run"]

def compare(name: str, test: str, *, out: Path, reference: Path | None = None, methods=None, seeds: int = 3,
            k: int = 4, train_pool: int | None = None, test_limit: int | None = None, steps: int | None = None,
            eval_every: int | None = None, anchor_k: int = 8, threads: int | None = None, lm: str = DEFAULT_LM,
            template: Path | None = None, indexes_dir: Path | None = None) -> dict:
    """The approximation report: every method against the fine-tuned reference on one test set.
    `eval_every`: soft prompts keep 10 % of the pool (at most 64 records) apart and stop early
    when its loss has not improved for 3 evaluations (up to `steps`, default 400), instead of a
    fixed step count. Returns the report dict with its markdown under "markdown"."""
    soft = cmp.default_soft_train()
    if eval_every:
        soft = dataclasses.replace(soft, max_steps=steps or 400, eval_fraction=0.1, max_eval=64, eval_every=eval_every,
                                   patience=3)
    elif steps:
        soft = dataclasses.replace(soft, max_steps=steps)
    report = cmp.run_compare(
        index_path(name, indexes_dir), test, out=Path(out), reference=reference, methods=methods, seeds=seeds,
        k=k, lm=lm, train_pool=train_pool or cmp.DEFAULT_TRAIN_POOL, test_limit=test_limit or cmp.DEFAULT_TEST_LIMIT,
        template=Template.from_json(template) if template else None, threads=threads, soft_train=soft,
        anchor_k=anchor_k)
    return {**report, "markdown": cmp.format_report(report)}


def bounds_theory(*, eps: float, delta: float, V: int, m: int, l: int, d: int, c: float = 1.0) -> list[dict]:
    return theory_table(eps, delta, V=V, m=m, l=l, d=d, c=c)


def bounds_run(experiment: str, *, out: Path, quick: bool = False, seed: int = 0, lm: str = DEFAULT_LM,
               k: int = 4, reference: Path | None = None, template: Path | None = None,
               settings: dict | None = None) -> dict:
    """One bound-validation experiment -> its results, with the report's markdown under "report".
    `retrieval` uses the engine (kNN-k over an index of each pool, default embedder and LM)
    against a reference: a fine-tuned LM folder when given, else a bag-of-words
    logistic-regression probe trained on each pool (labelled as such in the report).
    `settings` override fields of the experiment's preset (e.g. {"draws": 2})."""
    settings = dict(settings or {})
    try:  # checked before the LM loads
        experiment = experiments.Experiment(experiment)
    except ValueError:
        raise experiments.ExperimentError(f"unknown experiment {experiment!r} "
                                          f"(choose from {', '.join(e.value for e in experiments.Experiment)})") from None
    model = load_lm(lm)
    if experiment is not experiments.Experiment.RETRIEVAL:
        return experiments.run(experiment, quick=quick, out=Path(out), lm=model, seed=seed, **settings)
    tpl = Template.from_json(template) if template else None
    predict = engine_predictor(model, k=k, template=tpl)
    if reference:
        ref = engine_predictor(load_finetuned(reference), k=0, template=tpl)
        ref.fixed = True  # trained once: the report says the reference does not move with N
    else:
        ref = experiments.bow_logreg()
    return experiments.run(experiment, quick=quick, out=Path(out), lm=model, seed=seed, predict=predict,
                           reference=ref, k=k, **settings)
