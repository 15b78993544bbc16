"""icl_engine: retrieval-augmented in-context learning with a frozen LM."""

__version__ = "0.1.0"
