"""Prompt templates made from the data itself, for files that come without one.

    tpl, notes = data_template(dataset)            # the default for an index built from a file
    candidates = template_candidates(dataset)      # what `--auto-template` scores (template_search.py)

A classification default calls the input by its field's name ("Review:", "Utterance:"; "Text:"
when the field name is no word), ends with an answer cue (the label field's name when it is a
word, else "Label:"), and shows identifier-like labels as words (`add_to_playlist` -> "add to
playlist"; the label itself stays what the user gave). An instruction that names the task and
lists the labels is available (`instruction=True`, and a search candidate) but is not the
default: with the packaged SmolLM2-135M it cost 6.8 points of kNN-8 accuracy on Rotten Tomatoes
and the held-out slices of both RT and SNIPS preferred the prompt without it
(benchmarks/results/templates/). Generation gets its fields' names.
"""

from __future__ import annotations

import re

from .data import Dataset, TaskKind
from .prompt import Template
from .registry import builtin_template

__all__ = ["MAX_LISTED_LABELS", "TemplateError", "verbalize", "data_template", "template_candidates",
           "resolve_template"]

MAX_LISTED_LABELS = 50  # more labels than this are not listed in the instruction
_WORD = re.compile(r"[A-Za-z][A-Za-z ]{0,30}\Z")  # a field name that reads as a word ("review", "intent")
_GENERIC = {"text", "input", "label", "output", "target", "answer", "source", "sentence"}


class TemplateError(ValueError):
    """Labels that cannot be told apart once shown as words; one-line message naming them."""


def verbalize(label: str) -> str:
    """An identifier-like label as words: add_to_playlist / add-to-playlist / AddToPlaylist ->
    "add to playlist". Anything else (words already, numbers) is left as it is."""
    if " " in label.strip():
        return label
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", label)  # camelCase -> camel Case
    words = re.sub(r"[_\-]+", " ", words).strip()
    if words == label or not words:
        return label
    return words.lower() if not words.isupper() else words


def _field_word(field: str | None, fallback: str) -> str:
    """"review" -> "Review"; "review_text" -> "Review text"; no word -> the fallback."""
    if not field:
        return fallback
    word = re.sub(r"[_\-]+", " ", field).strip()
    return word[:1].upper() + word[1:] if _WORD.match(word) else fallback


def _verbalizers(labels: tuple[str, ...]) -> dict[str, str]:
    words = {lab: verbalize(lab) for lab in labels}
    by_word: dict[str, list[str]] = {}
    for lab, word in words.items():
        by_word.setdefault(word.lower(), []).append(lab)
    clashes = [labs for labs in by_word.values() if len(labs) > 1]
    if clashes:
        raise TemplateError(f"labels {clashes[0]} read the same once written as words "
                            f"({words[clashes[0][0]]!r}); rename them or give --template")
    return {lab: word for lab, word in words.items() if word != lab}


def _parts(dataset: Dataset) -> tuple[str, str, str | None]:
    """(input word, answer cue from the output field or None, noun for the instruction)."""
    in_field, out_field = (tuple(dataset.fields) + (None, None))[:2]
    default_in = "Text" if dataset.kind is TaskKind.CLASSIFICATION else "Input"
    noun_word = _field_word(in_field, default_in)
    cue = _field_word(out_field, "") if out_field and out_field.lower() not in _GENERIC else None
    return noun_word, cue or None, noun_word.lower()


def data_template(dataset: Dataset, *, instruction: bool = False, verbalized: bool = True,
                  cue: str | None = None) -> tuple[Template, list[str]]:
    """The default template for `dataset` (see the module doc) and notes for the user."""
    notes: list[str] = []
    noun_word, field_cue, noun = _parts(dataset)
    if dataset.kind is TaskKind.GENERATION:
        out = _field_word(dataset.fields[1] if len(dataset.fields) > 1 else None, "Output")
        return Template(input_format=f"{noun_word}: {{input}}\n{out}:", output_format=" {output}"), notes
    verbalizers = _verbalizers(dataset.labels) if verbalized else {}
    shown = [verbalizers.get(lab, lab) for lab in dataset.labels]
    text = ""
    if instruction:
        if len(shown) > MAX_LISTED_LABELS:
            text = f"Classify each {noun}."
            notes.append(f"{len(shown)} labels are too many to list in the instruction (over {MAX_LISTED_LABELS}): "
                         "the demonstrations show them")
        else:
            text = f"Classify each {noun} as one of: {', '.join(shown)}."
    cue = cue or field_cue or "Label"
    return Template(instruction=text, input_format=f"{noun_word}: {{input}}\n{cue}:", output_format=" {output}",
                    separator="\n\n", verbalizers=verbalizers), notes


def template_candidates(dataset: Dataset) -> dict[str, Template]:
    """A handful of templates for the search, the default first, duplicates dropped: the
    default, then one change at a time: an instruction, the raw labels, other answer cues."""
    default, _ = data_template(dataset)
    if dataset.kind is TaskKind.GENERATION:
        return {"default": default, "no instruction or field names": Template(input_format="{input}\n",
                                                                            output_format="{output}")}
    _, field_cue, _ = _parts(dataset)
    variants = {"default": {}, "with instruction": {"instruction": True}, "raw labels": {"verbalized": False}}
    for cue in dict.fromkeys(c for c in ("Label", "Answer", field_cue) if c and c != (field_cue or "Label")):
        variants[f"cue {cue!r}"] = {"cue": cue}
    out: dict[str, Template] = {}
    for name, change in variants.items():
        tpl, _ = data_template(dataset, **change)
        if tpl not in out.values():
            out[name] = tpl
    return out


def resolve_template(kind: TaskKind, *, given: Template | None = None, soft=None,
                     stored: dict | None = None, dataset: str | None = None) -> Template:
    """The template by the documented precedence: given > soft prompt's > the one stored with
    the index (`index.template`) > the built-in dataset's (by name) > the task default."""
    if given is not None:
        return given
    if soft is not None and soft.template is not None:
        return soft.template
    if stored:
        return Template.from_dict(stored)
    return (builtin_template(dataset) if dataset else None) or Template.default(kind)
