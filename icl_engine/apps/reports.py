"""The studies behind the front ends: the sample-size bounds and the experiments that check
their shapes."""

from __future__ import annotations

from pathlib import Path

from ..core.adapters import load_finetuned
from ..core.choices import DEFAULT_LM
from ..core.lm import load_lm
from ..core.prompt import Template
from ..studies import experiments
from ..studies.bounds import theory_table
from ..studies.experiments.retrieval import engine_predictor

__all__ = ["bounds_theory", "bounds_run"]


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
