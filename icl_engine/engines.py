"""Long-lived engines: a small cache of loaded Engines keyed by their config, so a server, a
Ray actor or a notebook loads the LM, the embedder and the index once and answers many calls.

    cache = EngineCache(size=2)
    engine = cache.get(PipelineConfig(index="rt"))      # loaded on the first call
    engine = cache.get(PipelineConfig(index="rt"))      # the same object afterwards
    engine = cache.get(PipelineConfig(index="rt", k=4)) # a new engine that reuses the loaded LM and index

An entry is keyed by every field of the config and by the index's current version (index_version),
so rebuilding or replacing an index under the same name loads it afresh.
The least recently used engine is dropped when the cache is full. Not thread-safe: give each
worker thread its own cache, or hold a lock around get(). `EngineCache(lm=model)` gives every
engine that one loaded LM (a service serving all its indexes with one model). `on_load` is
called with each engine the cache loads: the `icl` command sets `ENGINES.on_load` to freeze the
loaded heap (`freeze_loaded_heap`), as `icl serve` does once its engines are loaded.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from typing import Callable

from .backend import LMBackend
from .config import PipelineConfig
from .index import index_path, index_version
from .pipeline import Engine

__all__ = ["EngineCache", "ENGINES", "get_engine", "freeze_loaded_heap"]


def _folder_stamp(config: PipelineConfig) -> str | None:
    try:
        return index_version(index_path(config.index, config.indexes_dir))
    except ValueError:
        return None  # a bad name: Engine.load will say so


def freeze_loaded_heap() -> None:
    """Once the LM and the indexes are loaded, their objects and the libraries' (~400,000
    tracked by the garbage collector) live as long as the process: frozen, the full collections
    no longer walk them. Unfrozen, each full collection took ~0.2-0.3 s of CPU (a pause for
    every request in flight) once ~100,000 objects had survived the younger ones; an evaluation
    paid one every 2,000-4,000 queries, 0.05-0.1 ms a query on average (issue 14). A
    process-wide choice, so the process's owner makes it (`icl serve`, the `icl` command, the
    Ray engine actors), not the library."""
    gc.collect()  # garbage made while loading is not frozen with the rest
    gc.freeze()


class EngineCache:
    def __init__(self, size: int = 2, *, lm: LMBackend | None = None,
                 on_load: Callable[[Engine], None] | None = None):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.lm = lm  # when given, the LM of every engine (its configs' lm fields only name it)
        self.on_load = on_load  # called with each engine this cache loads
        self._engines: OrderedDict[tuple, Engine] = OrderedDict()

    def __len__(self) -> int:
        return len(self._engines)

    def get(self, config: PipelineConfig, **parts) -> Engine:
        """The cached engine of `config`, else a new one, built from `parts` (an index and its
        embedder the caller holds loaded) and what cached engines can share."""
        stamp = _folder_stamp(config)
        key = (config.key(), stamp)
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        engine = Engine.load(config, **{**self._reusable(config, stamp), **parts})
        self._engines[key] = engine
        while len(self._engines) > self.size:
            self._engines.popitem(last=False)
        if self.on_load is not None:
            self.on_load(engine)
        return engine

    def _reusable(self, config: PipelineConfig, stamp) -> dict:
        """Parts of cached engines this config can share: the LM (same name, dtype, trust
        setting) and the index with its embedder (same folder, unchanged)."""
        parts = {} if self.lm is None else {"lm": self.lm}
        for (key, other_stamp), engine in self._engines.items():
            c = engine.config
            if self.lm is None and (c.lm, c.dtype, c.trust_remote_code) == (config.lm, config.dtype,
                                                                              config.trust_remote_code):
                parts["lm"] = engine.lm
            same_folder = index_path(c.index, c.indexes_dir) == index_path(config.index, config.indexes_dir)
            if stamp is not None and other_stamp == stamp and same_folder:
                parts["index"], parts["embedder"] = engine.index, engine.embedder
        return parts

    def clear(self) -> None:
        self._engines.clear()


ENGINES = EngineCache()  # the library's default cache (api.py's functions use it)


def get_engine(config: PipelineConfig | Engine, cache: EngineCache | None = None) -> Engine:
    """An engine given as is, or the cached (else newly loaded) engine of a config."""
    return config if isinstance(config, Engine) else (cache or ENGINES).get(config)
