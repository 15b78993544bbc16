"""What a query returns: a Prediction (classification) or a Generation, each with the
demonstrations its prompt showed. Plain frozen dataclasses, JSON-ready through dataclasses.asdict."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Demo", "Prediction", "Generation"]


@dataclass(frozen=True)
class Demo:
    id: str
    score: float  # similarity to the query (kNN prompting: minus the KL distance)
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
