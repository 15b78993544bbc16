"""What every route shares: the one worker thread that runs all model work (torch calls and the
engine cache are used from that thread only, so nothing needs a lock), the LM loaded once, and
the loaded indexes with one embedder per embedder name.

Everything named `*_sync` runs on the worker thread; the routes reach it through `Service.call`.
"""

from __future__ import annotations

import asyncio
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from ..adapters import load_model
from ..backend import LMBackend
from ..config import PipelineConfig
from ..data import TaskKind
from ..embed import Embedder, get_embedder
from ..engines import EngineCache
from ..index import ExampleIndex, check_index_name, index_path, index_version
from ..pipeline import Engine
from .config import ServeConfig

__all__ = ["Service", "NotFound", "Options", "served_index"]

T = TypeVar("T")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a soft prompt's folder name, as index names


class NotFound(ValueError):
    """An index or soft prompt that does not exist (404)."""


@dataclass(frozen=True)
class Options:
    """The per-request settings that pick an engine (requests with equal options share batches)."""

    index: str
    k: int | None = None
    method: str | None = None
    calibration: str | None = None
    soft_prompt: str | None = None
    max_new_tokens: int | None = None


def served_index(name: str, indexes_dir: str | None) -> Path:
    """The folder of index `name`: a plain name under the indexes dir, never a path (ValueError,
    400), that holds an index (NotFound, 404)."""
    folder = index_path(check_index_name(name), indexes_dir)
    if index_version(folder) is None:
        raise NotFound(f"no index named {name!r}")
    return folder


class Service:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="icl-model")
        self.lm: LMBackend | None = None
        self.engines: EngineCache | None = None
        self.indexes: dict[str, tuple[str | None, ExampleIndex]] = {}  # name -> (version, index)
        self.embedders: dict[str, Embedder] = {}  # embedder name -> the one loaded
        self.ready = False
        self.load_error: str | None = None

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the worker thread (after the model work queued before it)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def close(self) -> None:
        self.worker.shutdown(wait=True)

    # ------------------------------------------------------------------ checks (event loop, cheap)

    def folder(self, name: str) -> Path:
        return served_index(name, self.config.indexes_dir)

    def soft_prompt_path(self, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"soft prompt name {name!r} must be 1-100 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        root = Path(self.config.adapters_dir or os.environ.get("ICL_ADAPTERS") or "adapters")
        path = root / name
        if not path.is_dir():
            raise NotFound(f"no soft prompt named {name!r}")
        return str(path)

    def pipeline_config(self, opts: Options) -> PipelineConfig:
        """The engine's config for these options (checked: 400 / 404 before any model work)."""
        self.folder(opts.index)
        c = self.config
        given = {k: v for k, v in (("k", opts.k), ("method", opts.method), ("calibration", opts.calibration),
                                   ("max_new_tokens", opts.max_new_tokens)) if v is not None}
        soft = self.soft_prompt_path(opts.soft_prompt) if opts.soft_prompt else None
        return PipelineConfig(index=opts.index, indexes_dir=c.indexes_dir, lm=c.lm, dtype=c.dtype, compile=c.compile,
                              batch_size=c.batch_size, soft_prompt=soft, **given)

    # ------------------------------------------------------------------ worker thread

    def load_sync(self) -> None:
        """The LM, then every index named at start; /readyz says ready after this."""
        self.lm = load_model(self.config.lm, dtype=self.config.dtype)
        self.engines = EngineCache(self.config.engines, lm=self.lm)
        for name in self.config.indexes:
            engine = self.engine_sync(self.pipeline_config(Options(name)))
            if self.config.compile and engine.index.kind is TaskKind.CLASSIFICATION:
                # torch.compile works at the first forward: pay it here, not in a request's
                # timeout. Batch 1 and batch 2 (a size-1 dimension gets a graph of its own).
                engine.classify(["warm-up"])
                engine.classify(["warm-up", "warm-up, twice"])

    def engine_sync(self, config: PipelineConfig) -> Engine:
        """The engine of a config, over the service's LM and its loaded copy of the index (loaded
        now if new, or again if it was rebuilt since)."""
        version = index_version(index_path(config.index, config.indexes_dir))
        held = self.indexes.get(config.index)
        if held is None or held[0] != version:
            index = ExampleIndex.load(index_path(config.index, config.indexes_dir))
            self.indexes[config.index] = held = (version, index)
        index = held[1]
        name = index.manifest["embedder"]
        if name not in self.embedders:
            self.embedders[name] = get_embedder(name)
        return self.engines.get(config, index=index, embedder=self.embedders[name])
