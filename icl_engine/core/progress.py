"""Progress of long work (loading a model, embedding an index, an evaluation) where the user can
see it.

On a terminal: a tqdm bar. Anywhere else (a pipe, nohup, a CI log) tqdm's carriage returns make
one unreadable line that appears at the end, so plain lines go to stderr instead: the first once
the work has run QUIET_S seconds, then one every ~10 s or every 10 % of the work, whichever comes
first, whether or not a unit of work finished meanwhile (a heartbeat thread says the work is
still going: a first LM batch, a model load). With `--log FILE` (or ICL_LOG) the same plain lines
are appended to that file too, terminal or not.

    with Progress(len(texts), "embedding", unit="texts") as bar:
        for chunk in chunks:
            ...; bar.update(len(chunk))
    with Progress(None, "loading the LM"):        # no count: elapsed time only
        lm = load_lm(name)

A short run stays quiet, and a command that fails before long work has run prints only its one
`error: ...` line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["Progress", "say", "set_log_file", "log_file", "LOG_ENV", "QUIET_S", "EVERY_S", "EVERY_FRACTION", "HEARTBEAT_S",
           "no_library_bars"]

LOG_ENV = "ICL_LOG"
QUIET_S = 5.0  # no line before the work has run this long
EVERY_S = 10.0  # then a line at least this often...
EVERY_FRACTION = 0.1  # ...and whenever another tenth of the work is done
HEARTBEAT_S = 1.0  # how often the heartbeat looks whether a line is due

_log_path: Path | None = None  # set by the CLI's --log; else the environment's ICL_LOG


def set_log_file(path: str | Path | None) -> None:
    """Append progress lines to `path` (None: back to $ICL_LOG). Checked now, by opening it
    for appending, so a bad path fails before any long work starts."""
    global _log_path
    _log_path = Path(path) if path else None
    if _log_path is not None:
        with open(_log_path, "a", encoding="utf-8"):
            pass


def log_file() -> Path | None:
    return _log_path or (Path(os.environ[LOG_ENV]) if os.environ.get(LOG_ENV) else None)


def _append(line: str) -> None:
    path = log_file()
    if path is not None:  # opened per line: a few lines a minute, and the file stays readable while we run
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def say(message: str, *, stderr: bool = True) -> None:
    """One timestamped line: on stderr (unless told not to) and in the log file."""
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    if stderr:
        print(line, file=sys.stderr, flush=True)
    _append(line)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Progress:
    """A counter of `total` units of work (None: no count, elapsed time only): a tqdm bar on a
    terminal, plain lines elsewhere and in the log file. `enabled=False` shows nothing at all."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.lines = 0, 0
        self.start = self.last_time = time.monotonic()
        self.last_done = 0
        self.bar = None
        self.terminal = enabled and sys.stderr.isatty()  # then the bar is the stderr view, lines go to the log only
        if self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = None
        if enabled and (not self.terminal or log_file() is not None):
            self._beat = threading.Thread(target=self._heartbeat, name="icl-progress", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        """A line when the work has gone on a while with none: QUIET_S, then every EVERY_S."""
        while not self._stop.wait(HEARTBEAT_S):
            now = time.monotonic()
            with self._lock:
                if now - self.start >= QUIET_S and (not self.lines or now - self.last_time >= EVERY_S):
                    self._line(now)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            now = time.monotonic()
            if now - self.start < QUIET_S:
                return
            total = self.total or 0
            if now - self.last_time >= EVERY_S or (total and self.done - self.last_done >= EVERY_FRACTION * total):
                self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        if self.total is None:
            text = f"{self.desc}: {_duration(elapsed)}"
        else:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {_duration(elapsed)}"
        if final:
            text += ", done"
        elif self.total and 0 < self.done < self.total:
            text += f", ~{_duration(elapsed * (self.total - self.done) / self.done)} left"
        say(text, stderr=not self.terminal)
        self.lines += 1
        self.last_time, self.last_done = now, self.done

    def close(self, *, failed: bool = False) -> None:
        """End the display; a run that printed lines says when it finished (not when it failed)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        with self._lock:
            if self.enabled and self.lines and not failed:
                self._line(time.monotonic(), final=True)
            self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


@contextmanager
def no_library_bars() -> Iterator[None]:
    """transformers' "Loading weights" bars (an LM, an embedder), noise on a load of a second or
    two, off for the load; they come back as they were."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
