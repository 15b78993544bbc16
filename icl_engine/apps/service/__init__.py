"""`icl serve`: the engine as a long-lived HTTP service (FastAPI + uvicorn), a front end beside
the CLI. One LM and embedder are loaded once and shared by every index; concurrent classify
requests are merged into one engine call, whatever their options (scheduler.py); under overload
work is refused at once rather than queued into a timeout.

    from icl_engine.apps.service import ServeConfig, create_app, serve
    serve(ServeConfig(indexes=("rt",), port=8000))       # blocks until SIGTERM / Ctrl-C

Modules: config.py (ServeConfig and its limits), scheduler.py (admission, deadlines, batching,
the one model thread), state.py (the LM, indexes and engines), guard.py (body and header limits
and timeouts), completions.py (the OpenAI-compatible scoring), metrics.py (Prometheus), app.py
(the routes), server.py (uvicorn, signals).
"""

from .app import create_app
from .config import ServeConfig, ServeError
from .server import serve

__all__ = ["ServeConfig", "ServeError", "create_app", "serve"]
