"""What every study writes and how: JSON-ready values, results.json + report.md written
atomically, a description of the machine and the LM, number formatting for markdown tables,
and matplotlib set up for files only. Shared by the bound experiments.

    write_report(out, results, markdown, json_name="results.json")   # -> the markdown, also on disk
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, is_dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from ..core.atomic import write_json as write_json_file
from ..core.atomic import write_text
from ..core.progress import say

__all__ = ["progress", "jsonable", "write_json", "write_report", "finish", "machine_info", "lm_info", "fmt",
           "pyplot", "save_figure"]


def progress(message: str) -> None:
    """One line on stderr per unit of work, so a long run shows where it is (and in the
    --log / ICL_LOG file, progress.py)."""
    say(message)


def jsonable(obj):
    """numpy scalars/arrays, dataclasses, Enums, Paths -> JSON types; NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Enum):
        return obj.value
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    return obj


def write_json(path: Path, obj) -> None:
    """Atomic write (temp file + rename), strict JSON (NaN/inf become null)."""
    write_json_file(path, jsonable(obj), allow_nan=False)


def write_report(out: Path, results: dict, markdown: str, *, json_name: str = "results.json",
                 md_name: str = "report.md") -> str:
    """out/results.json and out/report.md (both atomic); returns the markdown for the caller to show."""
    write_json(out / json_name, results)
    write_text(out / md_name, markdown)
    return markdown


def finish(out: Path, results: dict, t0: float, render) -> dict:
    """The end of an experiment: its wall time since `t0` (measurement, fits and plots),
    results.json and report.md (`render(results)`), and the results with the markdown under
    "report" for the front end to show."""
    results["wall_time_s"] = time.perf_counter() - t0
    results["report"] = write_report(out, results, render(results))
    return results


def machine_info() -> dict:
    import torch  # only the studies that ran an LM need it, and they have it loaded

    return {
        "platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def lm_info(lm) -> dict:
    return {"name": lm.name, "n_params": int(sum(p.numel() for p in lm.model.parameters())),
            "device": str(lm.device), "context_length": int(lm.context_length)}


def fmt(x, spec: str = ".3g") -> str:
    """A number for a markdown table; "–" for a missing or non-finite one."""
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend: never a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
