"""What an engine loads, and what a query asks, kept apart.

    spec = EngineSpec(index="rt")                       # built once: LM, embedder, index, soft prompt, anchors
    engine = ENGINES.get(spec)                          # engines.py: one engine per loaded spec
    engine.classify(texts, QueryOptions(k=4))           # what each call asks travels with it
    engine.classify(texts, [QueryOptions(k=4), QueryOptions(k=8)])   # one option set per text, one LM batch

`PipelineConfig` is the pair as one flat JSON object (`icl classify --config FILE`, the job file of
classify-file): it is both an EngineSpec and a QueryOptions, each field belonging to exactly one
of them, so `config.spec` and `config.options` split it with no list of names kept by hand.
What the fields resolve to (index folder, template, LM, adapter) is decided in one place,
resolve.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

from .atomic import read_json, write_json
from .choices import DEFAULT_LM, AnchorReadout, Calibration, DemoOrder, DType, Scoring, SelectionMethod
from .prompt import Template

__all__ = ["EngineSpec", "QueryOptions", "PipelineConfig", "ConfigError"]


class ConfigError(ValueError):
    """A pipeline config file that cannot be read; one-line message."""


def _enum(obj, name: str, kind: type[Enum]) -> None:
    """Coerce a frozen dataclass's string field to its enum, or one line naming the choices."""
    try:
        object.__setattr__(obj, name, kind(getattr(obj, name)))
    except ValueError:
        raise ValueError(f"{name} must be one of {[c.value for c in kind]}, got {getattr(obj, name)!r}") from None


def _as_dict(obj, cls) -> dict:
    """The fields of `cls` that `obj` has, JSON-ready (enums as their values, templates as dicts)."""
    out = {}
    for f in fields(cls):
        v = getattr(obj, f.name)
        out[f.name] = v.value if isinstance(v, Enum) else v.to_dict() if isinstance(v, Template) else v
    return out


@dataclass(frozen=True)
class EngineSpec:
    """What an engine loads once and every query shares."""

    index: str  # name under indexes_dir, or a path to an index folder
    indexes_dir: str | None = None
    lm: str = DEFAULT_LM
    # LM weights' dtype. None: exact float32 on CPU (bf16/fp16 on CUDA). "bfloat16" on a CPU with
    # AMX is several times faster but changes the scores (benchmarks/classify_bench.py reports by how much).
    dtype: str | None = None
    # torch.compile the LM's forward (backends with a `compile` method): about twice the scoring
    # speed on a GPU after a start-up compile of one to a few minutes; on a CPU it rarely pays.
    compile: bool = False
    trust_remote_code: bool = False
    template: Template | None = None  # None: the index's template.json, else the task default
    soft_prompt: str | None = None  # a soft prompt folder (icl tune)
    # kNN prompting (knn_prompt.py): a folder of anchors built for this index, LM and template
    # (with its linear readout, when `icl anchors build --readout linear` fitted one)
    anchors: str | None = None
    # the index's fit (icl index fit) answers method "auto" when there is one for this index
    # version, LM and template (and the spec names no anchors or soft prompt of its own)
    fit: bool = True

    def __post_init__(self):
        if isinstance(self.template, dict):
            object.__setattr__(self, "template", Template(**self.template))
        if self.dtype is not None:
            try:
                object.__setattr__(self, "dtype", DType(self.dtype).value)
            except ValueError:
                raise ValueError(f"dtype must be one of {[d.value for d in DType]} or None, got {self.dtype!r}") from None

    @property
    def spec(self) -> "EngineSpec":
        """The EngineSpec fields alone (a PipelineConfig's loaded half)."""
        return EngineSpec(**{f.name: getattr(self, f.name) for f in fields(EngineSpec)})

    def key(self) -> str:
        """A stable text of the spec's fields: equal specs give equal keys (the engine cache's key)."""
        return json.dumps(_as_dict(self, EngineSpec), sort_keys=True)


@dataclass(frozen=True)
class QueryOptions:
    """What one query asks of a loaded engine."""

    method: SelectionMethod = SelectionMethod.AUTO  # auto: the index's fit when it has one, else knn
    k: int = 8
    budget: int | None = None  # total prompt tokens; None: the LM's context length
    calibration: Calibration = Calibration.NONE
    seed: int = 0
    batch_size: int = 8  # prompts per LM forward
    max_new_tokens: int = 64
    mmr_lambda: float = 0.5
    order: DemoOrder = DemoOrder.NEAREST_LAST  # where the most similar demonstration goes
    # kNN prompting, when the engine has anchors: the label shares of the `anchor_k` nearest
    # anchors get `anchor_weight` (1: kNN prompting alone, no demonstrations scored; 0 < w < 1:
    # mixed with the in-context label probabilities; None: 1 with anchors the spec names, none
    # otherwise); "linear" reads the anchors' features with their fitted readout instead of the vote.
    anchor_k: int = 8
    anchor_weight: float | None = None
    anchor_readout: AnchorReadout = AnchorReadout.KNN
    fitted: bool = False  # answered by the index's fit (set when method auto resolves to it)
    # exact: the whole prompt through the LM. cached: the demonstrations' keys/values come from
    # the index's KV cache (`icl index cache`) and only the query is run; k is then not bounded
    # by the context (kvcache.py says how positions are laid out).
    scoring: Scoring = Scoring.EXACT

    def __post_init__(self):
        for name, kind in (("method", SelectionMethod), ("calibration", Calibration), ("order", DemoOrder),
                           ("anchor_readout", AnchorReadout), ("scoring", Scoring)):
            _enum(self, name, kind)
        for name, low in (("k", 0), ("anchor_k", 1), ("batch_size", 1), ("max_new_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget <= 0):
            raise ValueError(f"budget must be a positive integer, got {self.budget!r}")
        if self.anchor_weight is not None and not 0.0 < self.anchor_weight <= 1.0:
            raise ValueError(f"anchor_weight must be in (0, 1], got {self.anchor_weight}")

    @property
    def options(self) -> "QueryOptions":
        """The QueryOptions fields alone (a PipelineConfig's per-query half)."""
        return QueryOptions(**{f.name: getattr(self, f.name) for f in fields(QueryOptions)})

    def to_dict(self) -> dict:
        return _as_dict(self, QueryOptions)


@dataclass(frozen=True)
class PipelineConfig(QueryOptions, EngineSpec):
    """An EngineSpec and the QueryOptions of its queries, as one flat object (see the module doc)."""

    def __post_init__(self):
        EngineSpec.__post_init__(self)
        QueryOptions.__post_init__(self)

    def to_dict(self) -> dict:
        return _as_dict(self, PipelineConfig)

    def replace(self, **changes) -> "PipelineConfig":
        return PipelineConfig(**{**self.to_dict(), **changes})

    @classmethod
    def of(cls, spec: EngineSpec, options: QueryOptions | None = None) -> "PipelineConfig":
        return cls(**_as_dict(spec, EngineSpec), **_as_dict(options or QueryOptions(), QueryOptions))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "pipeline config") -> "PipelineConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{where}: unknown pipeline config fields {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required field missing
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "PipelineConfig":
        return cls.from_dict(read_json(path, "the pipeline config", ConfigError), where=str(path))


assert not {f.name for f in fields(EngineSpec)} & {f.name for f in fields(QueryOptions)}  # each field on one side
