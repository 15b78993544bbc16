"""What every route shares: the LM loaded once, the loaded indexes with one embedder per embedder
name, and the engines over them (one per index and soft prompt: query options travel with each
request). Torch calls and the engine cache are used from the scheduler's one model thread only
(everything named `*_sync`), so nothing needs a lock; the cheap checks a request needs before it
is admitted (`spec`) run on the event loop and read the index's pointer once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ...core.config import EngineSpec
from ...core.data import TaskKind
from ...core.embed import Embedder, get_embedder
from ...core.engines import EngineCache
from ...core.index import ExampleIndex, check_index_name, index_path, index_version
from .config import ServeConfig

if TYPE_CHECKING:  # the model libraries load on the model thread, once the server answers
    from ...core.backend import LMBackend
    from ...core.pipeline import Engine

__all__ = ["Service", "NotFound", "served_index"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a soft prompt's folder name, as index names


class NotFound(ValueError):
    """An index or soft prompt that does not exist (404)."""


def served_index(name: str, indexes_dir: str | None) -> tuple[Path, str]:
    """The folder of index `name` and its current version: a plain name under the indexes dir,
    never a path (ValueError, 400), that holds an index (NotFound, 404)."""
    folder = index_path(check_index_name(name), indexes_dir)
    version = index_version(folder)
    if version is None:
        raise NotFound(f"no index named {name!r}")
    return folder, version


class Service:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.lm: LMBackend | None = None
        self.engines: EngineCache | None = None
        self.indexes: dict[str, ExampleIndex] = {}  # name -> the loaded copy (its .version says which)
        self.embedders: dict[str, Embedder] = {}  # embedder name -> the one loaded
        self.ready = False
        self.load_error: str | None = None

    # ------------------------------------------------------------------ checks (event loop, cheap)

    def soft_prompt_path(self, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"soft prompt name {name!r} must be 1-100 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        root = Path(self.config.adapters_dir or os.environ.get("ICL_ADAPTERS") or "adapters")
        path = root / name
        if not path.is_dir():
            raise NotFound(f"no soft prompt named {name!r}")
        return str(path)

    def spec(self, index: str, soft_prompt: str | None = None) -> tuple[EngineSpec, str]:
        """The engine a request names, and its index's current version (checked: 400 / 404 before
        any model work; the index's pointer is read here, once per request)."""
        _, version = served_index(index, self.config.indexes_dir)
        c = self.config
        soft = self.soft_prompt_path(soft_prompt) if soft_prompt else None
        return EngineSpec(index=index, indexes_dir=c.indexes_dir, lm=c.lm, dtype=c.dtype, compile=c.compile,
                          soft_prompt=soft), version

    # ------------------------------------------------------------------ model thread

    def load_sync(self) -> None:
        """The LM, then every index named at start; /readyz says ready after this."""
        from ...core.adapters import load_model

        self.lm = load_model(self.config.lm, dtype=self.config.dtype)
        self.engines = EngineCache(self.config.engines, lm=self.lm)
        for name in self.config.indexes:
            engine = self.engine_sync(*self.spec(name))
            if self.config.compile and engine.index.kind is TaskKind.CLASSIFICATION:
                # torch.compile works at the first forward: pay it here, not in a request's
                # timeout. Batch 1 and batch 2 (a size-1 dimension gets a graph of its own).
                engine.classify(["warm-up"])
                engine.classify(["warm-up", "warm-up, twice"])

    def engine_sync(self, spec: EngineSpec, version: str) -> Engine:
        """The engine of a spec over the service's LM and its loaded copy of the index at
        `version` (loaded now if new, or again if it was rebuilt since)."""
        index = self.indexes.get(spec.index)
        if index is None or index.version != version:
            index = self.indexes[spec.index] = ExampleIndex.load(index_path(spec.index, spec.indexes_dir))
        name = index.manifest["embedder"]
        if name not in self.embedders:
            self.embedders[name] = get_embedder(name)
        return self.engines.get(spec, version=index.version, index=index, embedder=self.embedders[name])
