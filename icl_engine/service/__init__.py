"""`icl serve`: the engine as a long-lived HTTP service (FastAPI + uvicorn), a front end beside
the CLI. One LM and embedder are loaded once and shared by every index; concurrent classify
requests are merged into one engine call (batcher.py).

    from icl_engine.service import ServeConfig, create_app, serve
    serve(ServeConfig(indexes=("rt",), port=8000))       # blocks until SIGTERM / Ctrl-C

Modules: config.py (ServeConfig), state.py (the worker thread and the engines), batcher.py
(micro-batching), completions.py (the OpenAI-compatible scoring), metrics.py (Prometheus),
app.py (the routes), server.py (uvicorn, signals).
"""

from .app import create_app
from .config import ServeConfig, ServeError
from .server import serve

__all__ = ["ServeConfig", "ServeError", "create_app", "serve"]
