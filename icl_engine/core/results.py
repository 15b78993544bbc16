"""What a query returns: a Prediction (classification) or a Generation, each with the
demonstrations its prompt showed. Plain frozen dataclasses, JSON-ready through dataclasses.asdict,
and named in the project's one vocabulary (docs/vocabulary.md): a classification record is
`text` + `label`, a generation record `input` + `output`, whether it is a query, an answer, a
demonstration or a row of a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Demo", "GenerationDemo", "Prediction", "Generation"]


@dataclass(frozen=True)
class Demo:
    """A classification demonstration: a record of the index and its similarity to the query."""

    id: str
    score: float  # similarity to the query (kNN prompting: minus the KL distance)
    text: str
    label: str


@dataclass(frozen=True)
class GenerationDemo:
    """A generation demonstration: a record of the index and its similarity to the query."""

    id: str
    score: float
    input: str
    output: str


@dataclass(frozen=True)
class Prediction:
    text: str  # the query
    label: str  # the predicted label
    probs: dict[str, float]  # label -> probability, in the index's label order
    log_scores: list[float]  # uncalibrated log p(label | prompt), in the index's label order
    demo_ids: list[str]  # the demonstrations' record ids, in prompt order
    prompt_tokens: int
    demos: list[Demo] = field(default_factory=list)  # the demonstrations themselves, in prompt order
    answered_by: str = ""  # what answered, in words: "knn-8", "knn-8 pmi", "readout", "fit: <its setting>", ...
    skipped: tuple[str, ...] = ()  # ids of demonstrations too long for the budget on their own
    dropped: int = 0  # demonstrations left out because the more similar ones kept filled the budget
    short: int = 0  # fewer demonstrations than k: the index has no more distinct inputs


@dataclass(frozen=True)
class Generation:
    input: str  # the query
    output: str  # the generated text
    demo_ids: list[str]
    prompt_tokens: int
    demos: list[GenerationDemo] = field(default_factory=list)
    answered_by: str = ""  # as in Prediction
    skipped: tuple[str, ...] = ()  # as in Prediction
    dropped: int = 0
    short: int = 0
