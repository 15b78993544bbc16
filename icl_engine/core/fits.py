"""The fit attached to an index version (`icl index fit`): how its queries are answered when they
ask for method "auto" — the query options chosen on a validation split, and what was fitted for
them (kNN prompting's anchors with their readout, or a soft prompt).

On disk: `<index folder>/fits/<version>/fit.json` (+ `anchors/`, `soft_prompt/`), published as
a whole. A fit belongs to one index version, LM and template: loaded only when all three match
(another LM or template simply has no fit; `load_fit` says why when asked to insist).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .atomic import read_json
from .config import QueryOptions

__all__ = ["Fit", "FitError", "fit_folder", "read_fit", "FITS_DIR", "FIT_FILE"]

FITS_DIR, FIT_FILE = "fits", "fit.json"


class FitError(ValueError):
    """A fit that does not belong to this index version, LM or template; one line."""


@dataclass
class Fit:
    info: dict  # fit.json: the setting, its options, the selection's table, what was trained
    options: QueryOptions  # the options of a query the fit answers (fitted=True)
    folder: Path

    @property
    def name(self) -> str:
        return self.info["setting"]


def fit_folder(index_folder: str | Path, version: str) -> Path:
    return Path(index_folder) / FITS_DIR / version


def read_fit(index_folder: str | Path, version: str | None, *, lm: str, template: dict) -> Fit | None:
    """The fit of this index version for this LM and template, or None when there is none."""
    if not version:
        return None
    folder = fit_folder(index_folder, version)
    if not (folder / FIT_FILE).is_file():
        return None
    info = read_json(folder / FIT_FILE, "an index fit", FitError)
    if info.get("index_version") != version or info.get("lm") != lm or info.get("template") != template:
        return None  # fitted for another LM or template: those engines answer without it
    options = QueryOptions(**{**info["options"], "fitted": True})
    return Fit(info, options, folder)
