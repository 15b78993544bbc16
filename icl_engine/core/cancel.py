"""Cooperative cancellation of model work. A long-lived server runs each piece of work in a scope
whose `stop` says when nobody waits for it any more (its deadline passed, its client left); the
loops that drive the LM check it between batches of the scoring pass and between decoding steps,
and end the work there with `Cancelled`, so abandoned work frees the model for the next request.
Outside a scope (the CLI, a notebook) the checks cost one context-variable read.

    with cancel.scope(lambda: time.monotonic() > deadline):
        engine.classify(texts)          # raises Cancelled at the next LM batch once the deadline passes
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

__all__ = ["Cancelled", "scope", "check"]

_STOP: ContextVar[Callable[[], bool] | None] = ContextVar("icl_engine_stop", default=None)


class Cancelled(Exception):
    """The work's scope said stop: its result is no longer wanted (not a user mistake)."""


@contextmanager
def scope(stop: Callable[[], bool]) -> Iterator[None]:
    """Run the block with `stop` checked at every LM batch and decoding step (this thread only)."""
    token = _STOP.set(stop)
    try:
        yield
    finally:
        _STOP.reset(token)


def check() -> None:
    """Raise Cancelled when the current scope's stop says so."""
    stop = _STOP.get()
    if stop is not None and stop():
        raise Cancelled("the work was cancelled: its deadline passed or its client left")
