"""`ICLClassifier`: in-context classification as a scikit-learn estimator. `fit` embeds the
labelled texts into an index held in memory (nothing is trained: the LM stays frozen and the
"model" is the pool of demonstrations), `predict` classifies each text with its k most similar
demonstrations, so `cross_val_score`, `GridSearchCV` (over k, method, calibration...) and
pipelines work as with any classifier.

    clf = ICLClassifier(k=8).fit(train_texts, train_labels)
    clf.predict(["a tender, funny film"]), clf.predict_proba(texts), clf.score(texts, labels)

The LM and the embedder are loaded once per process and shared by every clone (scikit-learn
clones an estimator for each fold).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from ..core.choices import DEFAULT_EMBEDDER, DEFAULT_LM

__all__ = ["ICLClassifier"]


@lru_cache(maxsize=4)
def _lm(name: str, dtype: str | None):
    from ..core.lm import load_lm

    return load_lm(name, dtype=dtype)


@lru_cache(maxsize=4)
def _embedder(name: str):
    from ..core.embed import get_embedder

    return get_embedder(name)


def _texts(X) -> list[str]:
    """X as a list of strings: a sequence of texts, or a one-column 2-D array of them."""
    arr = np.asarray(X, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or not all(isinstance(t, str) for t in arr):
        raise ValueError("X must be a sequence of texts (strings)")
    return list(arr)


class ICLClassifier(ClassifierMixin, BaseEstimator):
    """In-context classification with retrieved demonstrations (see the module doc).

    k, method, calibration, scoring, batch_size, seed: the query options (QueryOptions); lm,
    embedder, dtype: what is loaded; template: a prompt Template (default: one made from the
    labels, as `icl index build` makes for a file). scoring "cached": `fit` also runs every
    demonstration through the LM once and keeps their keys and values in memory (as `kv_dtype`,
    core/kvcache.py), and queries run only their own tokens."""

    def __init__(self, k: int = 8, method: str = "knn", calibration: str = "none", scoring: str = "exact",
                 lm: str = DEFAULT_LM, embedder: str = DEFAULT_EMBEDDER, template=None, batch_size: int = 8,
                 seed: int = 0, dtype: str | None = None, kv_dtype: str = "bfloat16"):
        self.k, self.method, self.calibration, self.scoring = k, method, calibration, scoring
        self.lm, self.embedder, self.template, self.dtype, self.kv_dtype = lm, embedder, template, dtype, kv_dtype
        self.batch_size, self.seed = batch_size, seed

    def fit(self, X, y) -> "ICLClassifier":
        from ..core.choices import KVDType, Scoring
        from ..core.data import Dataset, TaskKind, make_records
        from ..core.index import ExampleIndex
        from ..core.kvcache import kv_cache_in_memory
        from ..core.pipeline import Engine, EngineSpec
        from ..core.templates import data_template

        scoring, kv_dtype = Scoring(self.scoring), KVDType(self.kv_dtype)  # a bad name fails before any work
        texts, labels = _texts(X), [str(v) for v in np.asarray(y, dtype=object).ravel()]
        if len(texts) != len(labels):
            raise ValueError(f"X has {len(texts)} texts but y has {len(labels)} labels")
        self.classes_ = np.array(sorted(set(labels)), dtype=object)
        if len(self.classes_) < 2:
            raise ValueError("ICLClassifier needs at least two classes")
        dataset = Dataset("estimator", TaskKind.CLASSIFICATION, make_records(zip(texts, labels)), tuple(self.classes_),
                          ("text", "label"))
        embedder = _embedder(self.embedder)
        index = ExampleIndex.build(dataset, embedder)
        template = self.template if self.template is not None else data_template(dataset)[0]
        self.engine_ = Engine.from_parts(EngineSpec(index="estimator", lm=self.lm, dtype=self.dtype), index, embedder,
                                         _lm(self.lm, self.dtype), template)
        if scoring is Scoring.CACHED:
            self.engine_.use_kv_cache(kv_cache_in_memory(self.engine_.lm, self.engine_.builder, index, dtype=kv_dtype,
                                                         batch_size=self.batch_size))
        self.n_features_in_ = 1
        return self

    def _predictions(self, X):
        from ..core.config import QueryOptions

        if not hasattr(self, "engine_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this ICLClassifier is not fitted yet: call fit(texts, labels) first")
        options = QueryOptions(k=self.k, method=self.method, calibration=self.calibration, scoring=self.scoring,
                               batch_size=self.batch_size, seed=self.seed)
        return self.engine_.classify(_texts(X), options)

    def predict(self, X) -> np.ndarray:
        return np.array([p.label for p in self._predictions(X)], dtype=object)

    def predict_proba(self, X) -> np.ndarray:
        """[n, n_classes] in the order of `classes_`."""
        return np.array([[p.probs[c] for c in self.classes_] for p in self._predictions(X)])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True  # texts, not numbers
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        tags.non_deterministic = False
        return tags

    def _more_tags(self) -> dict:  # the tag API of scikit-learn < 1.6
        return {"X_types": ["string"], "requires_y": True}
