"""One-line error messages: what every front end shows a user (the CLI's `error: ...` line)."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(e: BaseException) -> str:
    """The first line of an exception's message. OS errors read "No space left on device:
    'path'"; a message-less exception, or one that is no user mistake (not a ValueError,
    KeyError or OSError), is prefixed with its type, so an internal failure is recognisable."""
    if isinstance(e, OSError) and e.strerror:
        msg = f"{e.strerror}: {str(e.filename)!r}" if e.filename else e.strerror
    else:
        msg = str(e).strip()
    first = msg.splitlines()[0] if msg else type(e).__name__
    return first if isinstance(e, (ValueError, KeyError, OSError)) else f"{type(e).__name__}: {first}"
