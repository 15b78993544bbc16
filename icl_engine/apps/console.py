"""The `icl` console script's entry point. Commands that run a model import torch and
transformers (seconds): an interrupt during an import must end in one line too, not a traceback."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from ..core.engines import ENGINES, freeze_loaded_heap
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted: nothing was started", file=sys.stderr)
        sys.exit(130)
    # The process is the command's: once an engine is loaded, the full garbage collections stop
    # walking its long-lived objects (otherwise a pause every few thousand queries).
    ENGINES.on_load = lambda _engine: freeze_loaded_heap()
    cli_main()
