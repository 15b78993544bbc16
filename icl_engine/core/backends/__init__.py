"""LM backends: one module per backend, each a class with the `backend.LMBackend` methods
and a loader registered in `lm.py` (built-ins) or by `backend.register_backend`."""
