"""icl_engine: retrieval-augmented in-context learning with a frozen LM.

    import icl_engine as icl

    icl.build_index("reviews.jsonl", "reviews")             # embed a labelled file once, into ./indexes/reviews
    engine = icl.load("reviews")                            # the LM, embedder and index, loaded once
    [pred] = engine.classify(["a tender, funny film"], k=8)  # .label .probs .log_scores .demo_ids .demos
    icl.search("reviews", "a tender, funny film", k=4)      # the demonstrations the index holds for a text
    icl.cache_index("reviews")                              # each demonstration's keys/values, stored once:
    engine.classify(["a tender, funny film"], k=64, scoring="cached")   # then only the query is run
    icl.evaluate_file(icl.PipelineConfig(index="reviews", k=8), "test.jsonl")["accuracy"]
    clf = icl.ICLClassifier(k=8).fit(texts, labels)          # scikit-learn: predict, predict_proba, score

An Engine holds what is loaded (EngineSpec: index, LM, soft prompt, anchors); every call says
what it asks (QueryOptions: k, method, calibration, ...), as keywords or an options object.
Nothing heavy is imported until a name below is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "EngineSpec": "icl_engine.core.config", "QueryOptions": "icl_engine.core.config",
    "PipelineConfig": "icl_engine.core.config",
    "Engine": "icl_engine.core.pipeline", "ENGINES": "icl_engine.core.engines", "EngineCache": "icl_engine.core.engines",
    "Prediction": "icl_engine.core.results", "Generation": "icl_engine.core.results", "Demo": "icl_engine.core.results",
    "GenerationDemo": "icl_engine.core.results",
    "SelectionMethod": "icl_engine.core.choices", "Calibration": "icl_engine.core.choices",
    "Scoring": "icl_engine.core.choices",
    "ExampleIndex": "icl_engine.core.index", "load_dataset": "icl_engine.core.data",
    "build_index": "icl_engine.apps.indexes", "add_to_index": "icl_engine.apps.indexes",
    "remove_from_index": "icl_engine.apps.indexes", "index_info": "icl_engine.apps.indexes",
    "search": "icl_engine.apps.indexes", "list_indexes": "icl_engine.apps.indexes",
    "cache_index": "icl_engine.apps.indexes",
    "classify": "icl_engine.apps.queries", "generate": "icl_engine.apps.queries",
    "evaluate_file": "icl_engine.apps.queries", "classify_file": "icl_engine.apps.queries",
    "generate_file": "icl_engine.apps.queries", "load": "icl_engine.apps.queries",
    "ICLClassifier": "icl_engine.apps.estimator",
}
_RENAMED = {"list_indexes": "list_index_infos"}  # the public name of a function named otherwise in its module

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'icl_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
