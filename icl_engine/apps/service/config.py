"""The settings of one `icl serve` process: a small self-validating dataclass.

The limits follow what production inference servers do under overload (Triton's queue policies,
vLLM's and TGI's admission limits): work is admitted only while the queue ahead of it, priced
at the measured throughput, leaves it time to finish before its deadline; everything else is
refused at once (503 with Retry-After) instead of queueing into a timeout. A request's deadline
is `timeout_s` after it arrives; work whose deadline passes (or whose client leaves) is dropped
before it reaches the LM, or cancelled at the LM's next batch boundary if it is running.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.choices import DEFAULT_LM, DType

__all__ = ["ServeConfig", "ServeError"]


class ServeError(ValueError):
    """The service cannot start as asked (a bad setting, an index or LM that does not load)."""


@dataclass
class ServeConfig:
    indexes_dir: str | None = None  # arg > env ICL_INDEXES > ./indexes, as for every command
    indexes: tuple[str, ...] = ()  # loaded before /readyz says ready; others load when first named
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    lm: str = DEFAULT_LM  # the one LM every index is served with
    dtype: str | None = None
    compile: bool = False  # torch.compile the LM's forward (faster on a GPU; compiled before /readyz)
    max_batch_size: int = 64  # texts merged into one engine call (and the most texts one request may send)
    max_wait_ms: float = 5.0  # how long the first waiting request waits for others to join its batch
    batch_size: int = 8  # rows per LM forward inside an engine call (as `icl eval --batch-size`)
    timeout_s: float = 60.0  # a request's deadline: not answered by then, it gets a 504 and its work stops
    # admission: the most seconds of work (at the measured throughput) that may wait for the model,
    # and the most requests; past either, 503 at once with Retry-After
    max_queue_s: float = 10.0
    max_queue: int = 256
    api_key: str | None = None  # when set, every endpoint but /healthz and /readyz needs Bearer <key>
    max_text_chars: int = 20_000  # a longer text, search query or prompt is refused (413) before any model time
    max_body_bytes: int = 4 * 1024 * 1024  # a larger request body is refused (413) before it is read
    header_timeout_s: float = 10.0  # a connection whose request headers are not complete by then is closed
    body_timeout_s: float = 10.0  # a request whose body has not arrived by then gets a 408
    keep_alive_s: int = 5  # an idle kept-alive connection is closed after this
    max_connections: int = 512  # more concurrent connections get a 503 from the server itself
    adapters_dir: str | None = None  # soft prompts are named by folder under it (default ./adapters)
    engines: int = 8  # engines kept loaded (one per index x soft prompt in use; options are per request)

    def __post_init__(self):
        self.indexes = tuple(self.indexes)
        if not 0 <= self.port <= 65535:
            raise ServeError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "batch_size", "max_text_chars", "engines", "max_queue", "max_body_bytes",
                     "keep_alive_s", "max_connections"):
            if getattr(self, name) < 1:
                raise ServeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ServeError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("timeout_s", "max_queue_s", "header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ServeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServeError("api_key is empty")
        if self.dtype is not None:
            self.dtype = DType(self.dtype).value
