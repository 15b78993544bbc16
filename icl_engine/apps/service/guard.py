"""What a slow or greedy client cannot do to the service: hold a connection open with headers it
never finishes, trickle a body forever, or make it read a body larger than it takes.

- `BodyGuard` (ASGI middleware): a Content-Length over `max_bytes` is refused with 413 before a
  byte of the body is read; a chunked body is counted as it arrives (413 past the limit); a body
  that has not fully arrived `timeout_s` after the request began gets a 408.
- `guarded_h11(header_timeout_s)`: uvicorn's h11 protocol with a deadline on request headers:
  a connection whose next request's headers are not complete in time is closed (uvicorn's own
  keep-alive timer runs only after a response, and never while headers trickle in).
"""

from __future__ import annotations

import asyncio
import time

import h11
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["BodyGuard", "guarded_h11"]

_CLOSE = {"Connection": "close"}  # the rest of the body is never read: the connection cannot carry another request


class BodyGuard:
    def __init__(self, app, *, max_bytes: int, timeout_s: float, on_refused=None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.on_refused = on_refused  # (status) -> response app: how a refusal before routing is answered

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, msg = (413, f"the request body is larger than {self.max_bytes} bytes") if length.isdigit() \
                else (400, "Content-Length is not a number")
            return await self.on_refused(status, msg, **_CLOSE)(scope, receive, send)
        deadline, seen, complete = time.monotonic() + self.timeout_s, 0, False

        async def guarded_receive():
            nonlocal seen, complete
            if complete:  # the body is in: what follows is the wait for a disconnect, with no deadline
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s",
                                    headers=_CLOSE) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, f"the request body is larger than {self.max_bytes} bytes", headers=_CLOSE)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol subclass that closes a connection whose request headers take longer than
    `header_timeout_s` (counted from the connection, or from the end of its last response)."""

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE:  # no complete request headers yet: nothing to answer
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in: its body has BodyGuard
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11
