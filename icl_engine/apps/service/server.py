"""Run the app with uvicorn until SIGTERM or Ctrl-C.

Shutdown is uvicorn's graceful one: stop accepting, finish the requests in flight (waiting up to
the request timeout plus a few seconds), then the app's lifespan stops the batcher and the
worker thread. uvicorn re-raises the signal it caught once it is done; here that signal finds a
handler that ignores it, so a requested stop ends the process with exit code 0, not as killed.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from ...core.engines import freeze_loaded_heap
from ...core.errors import one_line
from .app import create_app
from .config import ServeConfig, ServeError
from .guard import guarded_h11
from .state import served_index

__all__ = ["serve"]


@contextmanager
def _stop_quietly():
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda *_: None) for s in signals}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def serve(config: ServeConfig, *, log_level: str = "info") -> None:
    """Serve until stopped. The indexes named at start are checked first (a wrong name fails
    here, in one line); an LM or index that then fails to load stops the server with ServeError."""
    import uvicorn

    for name in config.indexes:
        try:
            served_index(name, config.indexes_dir)
        except ValueError as e:
            raise ServeError(f"--index {name}: {one_line(e)}") from None
    fatal: list[BaseException] = []

    def stop(e: BaseException) -> None:
        fatal.append(e)
        server.should_exit = True

    app = create_app(config, on_fatal=stop, on_ready=freeze_loaded_heap)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=int(config.timeout_s) + 5,
        http=guarded_h11(config.header_timeout_s),  # slow or unfinished headers: the connection is closed
        timeout_keep_alive=config.keep_alive_s, limit_concurrency=config.max_connections,
        h11_max_incomplete_event_size=64 * 1024,  # request line and headers: larger is a 400
    ))
    with _stop_quietly():
        server.run()
    if fatal:
        raise ServeError(f"the service could not load: {one_line(fatal[0])}")
