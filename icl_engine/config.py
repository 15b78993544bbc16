"""The settings of one engine: which index, LM, template, soft prompt, and how to select and
score. A small self-validating dataclass, saved and loaded as JSON (`icl classify --config`).

    config = PipelineConfig(index="rt", k=8, method="knn")
    config.save("rt.json"); PipelineConfig.load("rt.json") == config

What a config's fields resolve to (index folder, template, LM, adapter) is decided in one
place, resolve.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .atomic import read_json, write_json
from .lm import DEFAULT_LM, DType
from .prompt import Template
from .readout import AnchorReadout
from .score import Calibration
from .select import DemoOrder, SelectionMethod

__all__ = ["PipelineConfig", "ConfigError"]


class ConfigError(ValueError):
    """A pipeline config file that cannot be read; one-line message."""


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
    # torch.compile the LM's forward (backends with a `compile` method): about twice the scoring
    # speed on a GPU after a start-up compile of one to a few minutes; on a CPU it rarely pays.
    compile: bool = False
    trust_remote_code: bool = False
    # kNN prompting (knn_prompt.py): a folder of anchors built for this index, LM and template; the
    # label shares of the `anchor_k` nearest anchors get `anchor_weight` (1: kNN prompting alone,
    # no demonstrations scored; 0 < w < 1: mixed with the in-context label probabilities).
    anchors: str | None = None
    anchor_k: int = 8
    anchor_weight: float = 1.0
    # "knn": the anchors' vote (Xu et al.); "linear": the linear readout fitted over the same
    # features and stored with the anchors (readout.py; `icl anchors build --readout linear`)
    anchor_readout: AnchorReadout = AnchorReadout.KNN

    def __post_init__(self):
        self.method = SelectionMethod(self.method)
        self.calibration = Calibration(self.calibration)
        self.order = DemoOrder(self.order)
        try:
            self.anchor_readout = AnchorReadout(self.anchor_readout)
        except ValueError:
            raise ValueError(f"anchor_readout must be one of {[r.value for r in AnchorReadout]}, "
                             f"got {self.anchor_readout!r}") from None
        if isinstance(self.template, dict):
            self.template = Template(**self.template)
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")
        if self.anchor_k < 1:
            raise ValueError(f"anchor_k must be >= 1, got {self.anchor_k}")
        if not 0.0 < self.anchor_weight <= 1.0:
            raise ValueError(f"anchor_weight must be in (0, 1], got {self.anchor_weight}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.dtype is not None:
            try:
                self.dtype = DType(self.dtype).value
            except ValueError:
                raise ValueError(f"dtype must be one of {[d.value for d in DType]} or None, got {self.dtype!r}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["method"], d["calibration"], d["order"] = self.method.value, self.calibration.value, self.order.value
        d["anchor_readout"] = self.anchor_readout.value
        return d

    def key(self) -> str:
        """A stable text of every field: equal configs give equal keys (the engine cache's key)."""
        return json.dumps(self.to_dict(), sort_keys=True)

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
