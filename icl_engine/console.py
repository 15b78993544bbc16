"""The `icl` console script's entry point. The CLI imports torch and transformers (seconds):
an interrupt during that import must end in one line too, not a traceback."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted: nothing was started", file=sys.stderr)
        sys.exit(130)
    cli_main()
