"""One place that turns a PipelineConfig into the parts an engine runs with, with one
precedence for each, used by the engine, the API, training set-up and the studies.

    parts = resolve(config)                  # or resolve(config, lm=lm, index=index): reuse loaded parts
    parts.folder, parts.index, parts.embedder, parts.lm, parts.soft, parts.template

Precedence (first that applies wins):
  index folder  config.index as a folder path if one exists, else a name under config.indexes_dir
                (that argument > env ICL_INDEXES > ./indexes); an ExampleIndex passed in is used
                as it is (its folder is still the one config.index names, for template.json).
  embedder      one passed in, else the embedder named in the index's manifest.
  LM            one passed in, else config.lm: a fine-tuned reference folder (icl finetune) loads
                with its adapter or weights; anything else through load_lm.
  adapter       config.soft_prompt (a soft prompt folder), else none; one trained on an earlier
                version of the index (before `icl index add/remove`) is used with a StaleWarning.
  template      config.template > the template the soft prompt was trained with > the template
                stored with the index (index.template) > the built-in dataset's template
                (registry) for the index's dataset name > Template.default(kind).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from .adapters import SoftPrompt, load_model, load_soft_prompt
from .config import PipelineConfig
from .embed import Embedder, get_embedder
from .index import ExampleIndex, StaleWarning, index_path, stale_note
from .lm import LM, compile_lm
from .prompt import Template
from .templates import resolve_template

__all__ = ["Resolved", "resolve"]


@dataclass
class Resolved:
    folder: Path  # the folder config.index names (it may not exist for an index passed in)
    index: ExampleIndex
    embedder: Embedder
    lm: LM
    soft: SoftPrompt | None
    template: Template


def resolve(config: PipelineConfig, *, lm: LM | None = None, embedder: Embedder | None = None,
            index: ExampleIndex | None = None, template: Template | None = None) -> Resolved:
    """Load what `config` names, reusing any part passed in (an LM already loaded, an index
    built in memory). `template` stands in for config.template when the config has none."""
    folder = index_path(config.index, config.indexes_dir)
    index = index if index is not None else ExampleIndex.load(folder)
    embedder = embedder or get_embedder(index.manifest["embedder"])
    lm = lm or load_model(config.lm, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if config.compile:
        compile_lm(lm)
    soft = load_soft_prompt(config.soft_prompt) if config.soft_prompt else None
    note = stale_note(index, soft.meta.get("index"), f"soft prompt {config.soft_prompt}") if soft else None
    if note:  # still usable (the LM and template are the same): said once, never refused
        warnings.warn(note, StaleWarning, stacklevel=2)
    tpl = resolve_template(index.kind, given=config.template or template, soft=soft, stored=index.template,
                           dataset=index.manifest.get("dataset"))
    return Resolved(folder, index, embedder, lm, soft, tpl)
