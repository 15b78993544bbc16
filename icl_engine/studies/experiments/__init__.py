"""Experiments that check the shapes of the ICL sample-size bounds (see `icl_engine.studies.bounds`).

    run("linear", quick=True, out=Path("reports/linear"))          # the default SmolLM2
    run("generation", quick=True, out=..., lm=my_lm, draws=4)      # settings override presets
    run("retrieval", quick=False, out=..., predict=p, reference=f)  # the engine, wired by the caller

Each experiment writes results.json (every point with its interval, every fit with its
interval and verdict, settings, wall time, machine), report.md and log-log PNGs into `out`.
`quick` presets finish in minutes on 2 CPU cores; full presets in under ~90 minutes.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from ...core.lm import load_lm
from .baselines import Predictor, bow_logreg, knn_vote
from .common import ExperimentError, apply_overrides
from .generation import GenerationConfig, run_generation
from .linear import LinearConfig, run_linear
from .retrieval import RetrievalConfig, run_retrieval

__all__ = [
    "Experiment",
    "ExperimentError",
    "run",
    "LinearConfig",
    "GenerationConfig",
    "RetrievalConfig",
    "run_linear",
    "run_generation",
    "run_retrieval",
    "knn_vote",
    "bow_logreg",
    "Predictor",
]


class Experiment(str, Enum):
    LINEAR = "linear"
    GENERATION = "generation"
    RETRIEVAL = "retrieval"


def run(experiment: str | Experiment, *, quick: bool, out: Path, lm=None, seed: int = 0,
        predict: Predictor | None = None, reference: Predictor | None = None, **settings) -> dict:
    """Run one experiment into `out` and return its results dict.

    `lm`: an `icl_engine.core.lm.LM` (None: `load_lm()`, the default SmolLM2; not used by
    `retrieval`). `settings` override fields of the experiment's config preset (e.g. draws=3).
    `retrieval` needs `predict` (the ICL engine) and `reference` (the fine-tuned model), both
    `(pool: Dataset, test: Dataset) -> (labels, probs [q, L])`.
    """
    try:
        exp = Experiment(experiment)
    except ValueError:
        raise ExperimentError(f"unknown experiment {experiment!r} (choose from {[e.value for e in Experiment]})") from None
    out = Path(out)
    if exp is Experiment.RETRIEVAL:
        if predict is None or reference is None:
            raise ExperimentError("retrieval needs predict= (the ICL engine) and reference= (the fine-tuned "
                                  "model); knn_vote() and bow_logreg() are baseline stand-ins")
        cfg = apply_overrides(RetrievalConfig.preset(quick), settings)
        return run_retrieval(out, predict=predict, reference=reference, config=cfg, seed=seed,
                             lm_name=getattr(lm, "name", None))
    if lm is None:
        lm = load_lm()
    if exp is Experiment.LINEAR:
        return run_linear(out, lm=lm, config=apply_overrides(LinearConfig.preset(quick), settings), seed=seed)
    return run_generation(out, lm=lm, config=apply_overrides(GenerationConfig.preset(quick), settings), seed=seed)
