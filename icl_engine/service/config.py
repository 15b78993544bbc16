"""The settings of one `icl serve` process: a small self-validating dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ..lm import DEFAULT_LM, DType

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
    timeout_s: float = 60.0  # a request not answered by then gets a 504
    api_key: str | None = None  # when set, every endpoint but /healthz and /readyz needs Bearer <key>
    max_text_chars: int = 20_000  # a longer text is refused (413) before it costs any model time
    adapters_dir: str | None = None  # soft prompts are named by folder under it (default ./adapters)
    engines: int = 32  # engines kept (one per index x k x method x calibration x soft prompt in use)

    def __post_init__(self):
        self.indexes = tuple(self.indexes)
        if not 0 <= self.port <= 65535:
            raise ServeError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "batch_size", "max_text_chars", "engines"):
            if getattr(self, name) < 1:
                raise ServeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ServeError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.timeout_s <= 0:
            raise ServeError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServeError("api_key is empty")
        if self.dtype is not None:
            self.dtype = DType(self.dtype).value
