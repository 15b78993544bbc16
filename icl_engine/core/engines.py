"""Long-lived engines: one loaded Engine per EngineSpec, so a server, a Ray actor, the CLI or a
notebook loads the LM, the embedder and the index once and answers many calls, each with its own
QueryOptions.

    cache = EngineCache(size=2)
    engine = cache.get(EngineSpec(index="rt"))     # loaded on the first call, the same object after
    engine.classify(texts, QueryOptions(k=4))      # options travel with the call, not the engine
    engine = cache.get(EngineSpec(index="rt", soft_prompt="adapters/rt-ipt"))  # a new engine, same LM and index

An entry is keyed by the spec and by the index's current version (index_version), so rebuilding
or replacing an index under the same name loads it afresh; a caller that has read the version
already passes it (`version=`), so a request reads the index's pointer once. The least recently
used engine is dropped when the cache is full. Not thread-safe: give each worker thread its own
cache, or hold a lock around get(). `EngineCache(lm=model)` gives every engine that one loaded LM
(a service serving all its indexes with one model). `on_load` is called with each engine the
cache loads: the `icl` command, `icl serve` and the Ray actors freeze the loaded heap there
(`freeze_loaded_heap`).
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from .config import EngineSpec
from .index import index_path, index_version
from .progress import Progress

if TYPE_CHECKING:  # the model libraries load with the first engine, not with this module
    from .backend import LMBackend
    from .pipeline import Engine

__all__ = ["EngineCache", "ENGINES", "get_engine", "freeze_loaded_heap"]


def _folder_stamp(spec: EngineSpec) -> str | None:
    try:
        return index_version(index_path(spec.index, spec.indexes_dir))
    except ValueError:
        return None  # a bad name: Engine.load will say so


def freeze_loaded_heap() -> None:
    """Once the LM and the indexes are loaded, their objects and the libraries' (~400,000
    tracked by the garbage collector) live as long as the process: frozen, the full collections
    no longer walk them. Unfrozen, every full collection walks them all (a pause for every
    request in flight), and one comes each time enough objects have survived the younger
    generations (benchmarks/results/overhead_bench_gc_freeze/ has the cost). A process-wide choice,
    so the process's owner makes it (`icl serve`, the `icl` command, the Ray engine actors), not
    the library."""
    gc.collect()  # garbage made while loading is not frozen with the rest
    gc.freeze()


class EngineCache:
    def __init__(self, size: int = 2, *, lm: LMBackend | None = None,
                 on_load: Callable[[Engine], None] | None = None):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.lm = lm  # when given, the LM of every engine (its specs' lm fields only name it)
        self.on_load = on_load  # called with each engine this cache loads
        self._engines: OrderedDict[tuple[str, str | None], Engine] = OrderedDict()

    def __len__(self) -> int:
        return len(self._engines)

    def get(self, spec: EngineSpec, *, version: str | None = None, **parts) -> Engine:
        """The cached engine of `spec` (a PipelineConfig counts as its spec), else a new one, built
        from `parts` (an index and its embedder the caller holds loaded) and what cached engines
        can share. `version`: the index's current version, when the caller has read it."""
        from .pipeline import Engine

        spec = spec.spec
        stamp = version if version is not None else _folder_stamp(spec)
        key = (spec.key(), stamp)
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        with Progress(None, f"loading the engine of index {spec.index} (LM {spec.lm})"):
            engine = Engine.load(spec, version=stamp, **{**self._reusable(spec, stamp), **parts})
        self._engines[key] = engine
        while len(self._engines) > self.size:
            self._engines.popitem(last=False)
        if self.on_load is not None:
            self.on_load(engine)
        return engine

    def _reusable(self, spec: EngineSpec, stamp: str | None) -> dict:
        """Parts of cached engines this spec can share: the LM (same name, dtype, trust setting)
        and the index with its embedder (same folder, unchanged)."""
        parts = {} if self.lm is None else {"lm": self.lm}
        folder = index_path(spec.index, spec.indexes_dir)
        for (_, other_stamp), engine in self._engines.items():
            s = engine.spec
            if self.lm is None and (s.lm, s.dtype, s.trust_remote_code) == (spec.lm, spec.dtype, spec.trust_remote_code):
                parts["lm"] = engine.lm
            if stamp is not None and other_stamp == stamp and index_path(s.index, s.indexes_dir) == folder:
                parts["index"], parts["embedder"] = engine.index, engine.embedder
        return parts

    def clear(self) -> None:
        self._engines.clear()


ENGINES = EngineCache()  # the one cache of this process: the CLI, the Python API and a Ray actor use it


def get_engine(spec: EngineSpec | Engine, cache: EngineCache | None = None) -> Engine:
    """An engine given as is, or the cached (else newly loaded) engine of a spec."""
    return (cache or ENGINES).get(spec) if isinstance(spec, EngineSpec) else spec
