"""The approximation report: how close does in-context learning with a frozen LM, with
and without soft prompts, get to fine-tuning the same LM on the same data?

    report = run_compare("rt", test, reference=Path("ft/rt"), out=Path("reports/rt"))

Every method runs on the same test subset and is compared with the fine-tuned reference's own
predictions on it:

    zero            zero-shot prompt, frozen LM
    random / knn    k random / k nearest demonstrations from the index, frozen LM
    prompt_tuning   soft prompt (Lester et al.) trained without demonstrations, evaluated without
    prefix_tuning   per-layer key/values (Li & Liang), trained and evaluated without demonstrations
    ipt             instruction prompt tuning (Sun et al. 2023): a prompt-tuning soft prompt trained
                    with each example's k nearest demonstrations and evaluated with kNN demos. This
                    IS "kNN + soft prompt"; the goal line is checked on it.
    ipt_random      the same, trained and evaluated with k random demonstrations
    prompt_tuning_knn  (not run by default) the prompt_tuning soft prompts evaluated with kNN demos
    ipt_distill / prompt_tuning_distill  the same soft prompts trained to match the reference:
                    its label distribution (KL), or for generation its greedy outputs as targets
    knn_prompting   (classification) Xu et al. 2023: the label shares of the query's KL-nearest
                    anchors (the LM's next-token distribution for every index record)
    knn_prompting_icl  (classification) the mean of kNN prompting's and kNN-k ICL's distributions
    knn_prompting_linear  (classification) the same anchors read by a linear readout fitted to
                    their gold labels (readout.py: (S+1) x L weights, the LM frozen)
    knn_distill / knn_prompting_distill / knn_prompting_icl_distill / knn_prompting_linear_distill
                    (classification, not run by
                    default: the reference first labels every index record, 21 min for 11,752
                    reviews on one CPU thread) kNN-k, kNN prompting and their mean over the pool
                    relabelled by the reference (the readout fitted to its labels): the frozen LM
                    reads the reference's labels
    finetuned       the reference (finetune.py), zero-shot prompts; trained into `reference` once

Soft prompts are trained once per seed on the same training pool as the reference, into
out/adapters/<method>-seed<s>/ (written beside, then renamed: a folder there is complete), and
every evaluation is kept in out/runs/<method>-seed<s>.json, so an interrupted run resumes. A
folder trained with other settings is refused, never silently overwritten.

Columns: accuracy / macro-F1 (BLEU / ROUGE-L for generation), agreement with the reference's
predictions, mean total-variation distance between the method's and the reference's label
distributions, each as mean and sample standard deviation over seeds; trainable parameters,
training seconds per seed, queries per second. report.json keeps every run's per-example
predictions and label distributions so all of it can be recomputed; report.md states Sun et
al.'s two findings and the goal line with the numbers and a verdict; report.png plots them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from ..core.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINETUNE_META_FILE, load_finetuned
from ..core.atomic import check_out_dir, publish_dir
from ..core.choices import DEFAULT_LM, SelectionMethod, SoftPromptMethod
from ..core.data import Dataset, TaskKind, group_references, load_dataset
from ..core.embed import Embedder, get_embedder
from ..core.evaluate import evaluate
from ..core.index import ExampleIndex, index_path
from ..core.knn_prompt import AnchorConfig, AnchorError, Anchors, build_anchors, index_fingerprint
from ..core.lm import LM, load_lm
from ..core.metrics import rouge_l_pair
from ..core.pipeline import Engine, PipelineConfig
from ..core.prompt import PromptBuilder, Template
from ..core.readout import LinearReadout, fit_readout
from ..core.templates import resolve_template
from ..train.checkpoint import CHECKPOINT_DIR
from ..train.distill import pool_teacher_logprobs, relabel
from ..train.finetune import FinetuneConfig, finetune
from ..train.loop import TrainSettings
from ..train.soft_prompt import SoftPromptConfig, train_soft_prompt
from .report import fmt, jsonable, machine_info, pyplot, save_figure, write_json, write_report

__all__ = [
    "CompareMethod",
    "CompareError",
    "DEFAULT_METHODS",
    "DEFAULT_K",
    "DEFAULT_SEEDS",
    "DEFAULT_TRAIN_POOL",
    "DEFAULT_TEST_LIMIT",
    "DEFAULT_N_VIRTUAL",
    "DEFAULTS_BASIS",
    "default_soft_train",
    "default_finetune",
    "agreement",
    "total_variation",
    "mean_total_variation",
    "run_compare",
    "open_study",
    "Study",
    "StudySettings",
    "format_report",
    "REPORT_JSON",
    "REPORT_MD",
    "REPORT_PNG",
]

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
RUN_FILE = "compare_run.json"  # beside each trained adapter: the settings it was trained with
FORMAT_VERSION = 1

# Defaults sized from a timing probe of SmolLM2-135M on this 2-core CPU (shared, load 3-7),
# float32, 1 torch thread: prompt-tuning step (batch 8) with k=4 kNN demos (~200 tokens incl. 20
# virtual) 8.3-8.9 s, without demos (~65 tokens) 2.4-3.2 s; full fine-tuning step (batch 8,
# zero-shot prompts) ~4.5 s; label scoring 1.6-2.8 q/s with k=4 demos, 8.5-9.3 q/s zero-shot.
# With 2 threads on the loaded machine the same step took 30-60 s (threads waiting on each other).
# Budget for Rotten Tomatoes, 3 seeds: 12 soft prompts x 50 steps of batch 4 (IPT ~4.3 s,
# PT/prefix ~1.4 s a step) ~ 29 min, reference 100 steps ~ 8 min (once), 18 evaluations of 200
# test reviews (10 with k=4 demos) 15-23 min, loading ~2 min: about an hour (52-61 min).
DEFAULT_K = 4
DEFAULT_SEEDS = 3
DEFAULT_TRAIN_POOL = 1000  # records drawn (seed 0) from the index for training soft prompts and the reference
DEFAULT_TEST_LIMIT = 200  # test records drawn (seed 0); accuracy's standard error is then ~3 points
DEFAULT_N_VIRTUAL = 20
DEFAULTS_BASIS = (
    "timing probe, SmolLM2-135M float32 on a shared 2-core CPU (load 3-7), 1 torch thread: prompt-tuning step "
    "(batch 8) with k=4 demos 8.3-8.9 s, without demos 2.4-3.2 s; full fine-tuning step (batch 8) ~4.5 s; scoring "
    "1.6-2.8 q/s with k=4 demos, 8.5-9.3 q/s zero-shot -> 50 steps of batch 4 per soft prompt, 100 steps of batch "
    "8 for the reference, 200 test examples: about an hour (52-61 min) for Rotten Tomatoes with 3 seeds")


def default_soft_train() -> TrainSettings:
    """Soft prompts: 50 AdamW steps of 4 (more updates per second than batch 8 on a CPU), no
    held-out split: with so few steps the last step is the one kept, and evaluating costs time."""
    return TrainSettings(max_steps=50, batch_size=4, eval_fraction=0.0, warmup_ratio=0.1)


def default_finetune() -> FinetuneConfig:
    """The reference: full fine-tuning, 100 steps of 8 (most of the 1000-record pool once)."""
    return FinetuneConfig(method="full", train=TrainSettings(max_steps=100, batch_size=8, eval_fraction=0.0))


class CompareError(ValueError):
    """A comparison that cannot run as asked; one-line message."""


class CompareMethod(str, Enum):
    ZERO = "zero"
    RANDOM = "random"
    KNN = "knn"
    PROMPT_TUNING = "prompt_tuning"
    PREFIX_TUNING = "prefix_tuning"
    IPT = "ipt"
    IPT_RANDOM = "ipt_random"
    PROMPT_TUNING_KNN = "prompt_tuning_knn"
    IPT_DISTILL = "ipt_distill"
    PROMPT_TUNING_DISTILL = "prompt_tuning_distill"
    KNN_PROMPTING = "knn_prompting"
    KNN_PROMPTING_ICL = "knn_prompting_icl"
    KNN_PROMPTING_LINEAR = "knn_prompting_linear"
    KNN_DISTILL = "knn_distill"
    KNN_PROMPTING_DISTILL = "knn_prompting_distill"
    KNN_PROMPTING_ICL_DISTILL = "knn_prompting_icl_distill"
    KNN_PROMPTING_LINEAR_DISTILL = "knn_prompting_linear_distill"
    FINETUNED = "finetuned"


@dataclass(frozen=True)
class _Spec:
    title: str
    demos: SelectionMethod  # demonstrations at evaluation
    train: SoftPromptMethod | None = None  # a soft prompt trained per seed
    train_demos: SelectionMethod | None = None  # IPT: the demonstrations it is trained with
    adapter: str | None = None  # whose adapters it evaluates (prompt_tuning_knn: prompt_tuning's)
    seeded: bool = False  # one run per seed (training seed, the random draw of demos, the anchors' context)
    distill: bool = False  # the soft prompt learns the reference's label distribution (train/distill.py)
    anchor_weight: float | None = None  # kNN prompting's share of the label probabilities (knn_prompt.py)
    relabel: bool = False  # demonstrations and anchors carry the reference's labels, not the gold ones
    readout: bool = False  # the anchors are read by a fitted linear readout instead of their vote (readout.py)


_Z, _R, _K = SelectionMethod.ZERO, SelectionMethod.RANDOM, SelectionMethod.KNN
_SPECS = {
    CompareMethod.ZERO: _Spec("zero-shot", _Z),
    CompareMethod.RANDOM: _Spec("random-k", _R, seeded=True),
    CompareMethod.KNN: _Spec("kNN-k", _K),
    CompareMethod.PROMPT_TUNING: _Spec("prompt tuning", _Z, SoftPromptMethod.PROMPT_TUNING, None, "prompt_tuning",
                                       True),
    CompareMethod.PREFIX_TUNING: _Spec("prefix tuning", _Z, SoftPromptMethod.PREFIX_TUNING, None, "prefix_tuning",
                                       True),
    CompareMethod.IPT: _Spec("IPT, kNN demos (= kNN + soft prompt)", _K, SoftPromptMethod.IPT, _K, "ipt", True),
    CompareMethod.IPT_RANDOM: _Spec("IPT, random demos", _R, SoftPromptMethod.IPT, _R, "ipt_random", True),
    CompareMethod.PROMPT_TUNING_KNN: _Spec("prompt tuning + kNN demos at test time", _K,
                                           SoftPromptMethod.PROMPT_TUNING, None, "prompt_tuning", True),
    CompareMethod.IPT_DISTILL: _Spec("IPT distilled from the reference, kNN demos", _K, SoftPromptMethod.IPT, _K,
                                     "ipt_distill", True, distill=True),
    CompareMethod.PROMPT_TUNING_DISTILL: _Spec("prompt tuning distilled from the reference", _Z,
                                               SoftPromptMethod.PROMPT_TUNING, None, "prompt_tuning_distill", True,
                                               distill=True),
    CompareMethod.KNN_PROMPTING: _Spec("kNN prompting (Xu et al. 2023)", _Z, seeded=True, anchor_weight=1.0),
    CompareMethod.KNN_PROMPTING_ICL: _Spec("kNN prompting + kNN-k ICL (mean of the two)", _K, seeded=True,
                                             anchor_weight=0.5),
    CompareMethod.KNN_PROMPTING_LINEAR: _Spec("kNN prompting's anchors, linear readout", _Z, seeded=True,
                                              anchor_weight=1.0, readout=True),
    CompareMethod.KNN_DISTILL: _Spec("kNN-k, demos labelled by the reference", _K, relabel=True),
    CompareMethod.KNN_PROMPTING_DISTILL: _Spec("kNN prompting, anchors labelled by the reference", _Z,
                                               seeded=True, anchor_weight=1.0, relabel=True),
    CompareMethod.KNN_PROMPTING_ICL_DISTILL: _Spec("kNN prompting + kNN-k ICL, labelled by the reference", _K,
                                                   seeded=True, anchor_weight=0.5, relabel=True),
    CompareMethod.KNN_PROMPTING_LINEAR_DISTILL: _Spec("kNN prompting's anchors, linear readout fitted to the "
                                                      "reference's labels", _Z, seeded=True, anchor_weight=1.0,
                                                      relabel=True, readout=True),
    CompareMethod.FINETUNED: _Spec("fine-tuned reference", _Z),
}
RELABELLED = tuple(m for m, spec in _SPECS.items() if spec.relabel)  # the reference labels the whole index first
DEFAULT_METHODS = tuple(m for m in CompareMethod if m not in (CompareMethod.PROMPT_TUNING_KNN,
                                                               CompareMethod.PROMPT_TUNING_DISTILL, *RELABELLED))
# vote over label distributions, or relabel the pool with the reference's labels: classification only
LABELS_ONLY = (CompareMethod.KNN_PROMPTING, CompareMethod.KNN_PROMPTING_ICL, CompareMethod.KNN_PROMPTING_LINEAR,
               *RELABELLED)
FROZEN = tuple(m.value for m in CompareMethod if m is not CompareMethod.FINETUNED)  # candidates for the goal


# ----------------------------------------------------------------------------- comparison measures


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of examples on which two methods give the same answer (labels, or generated text
    after stripping surrounding whitespace)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"agreement needs two equal, non-empty lists (got {len(a)} and {len(b)})")
    return float(np.mean([str(x).strip() == str(y).strip() for x, y in zip(a, b)]))


def total_variation(p, q) -> np.ndarray:
    """Per-example total-variation distance between label distributions p, q [n, L]:
    0.5 * sum_l |p - q|, in [0, 1] -> float64 [n]."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"total_variation needs two [n, L] arrays of one shape (got {p.shape} and {q.shape})")
    return 0.5 * np.abs(p - q).sum(axis=1)


def mean_total_variation(p, q) -> float:
    return float(total_variation(p, q).mean())


def paired_bootstrap(values: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of per-example `values` [n] (a paired difference, or
    0/1 agreement), resampling test examples with replacement. -> (low, high)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)  # [n_boot]
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


# ----------------------------------------------------------------------------- helpers


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()


def _load_index(index, indexes_dir) -> tuple[ExampleIndex, str, Path | None]:
    if isinstance(index, ExampleIndex):
        return index, str(index.manifest.get("name") or "index"), None
    folder = index_path(index, indexes_dir)
    if not folder.is_dir():
        raise CompareError(f"no index at {folder} (build it with `icl index build`)")
    return ExampleIndex.load(folder), Path(str(index)).name, folder


def _methods(methods) -> list[CompareMethod]:
    """The methods asked for, in table order, plus the reference (every column compares with it)."""
    if methods is None:
        asked = set(DEFAULT_METHODS)
    else:
        asked = set()
        for m in methods:
            try:
                asked.add(CompareMethod(m))
            except ValueError:
                raise CompareError(f"unknown method {m!r} (choose from {[x.value for x in CompareMethod]})") from None
    return [m for m in CompareMethod if m in asked or m is CompareMethod.FINETUNED]


def _test_subset(test: Dataset, limit: int | None) -> Dataset:
    """The first `limit` records of the test file (generation: its first `limit` distinct inputs,
    all their references): a fixed prefix, so a larger limit extends a smaller one."""
    if limit is None:
        return test
    if test.kind is TaskKind.GENERATION:
        inputs = list(dict.fromkeys(r.input for r in test.records))
        if limit >= len(inputs):
            return test
        keep = set(inputs[:limit])
        return test.select([j for j, r in enumerate(test.records) if r.input in keep], f"{test.name}[{limit} inputs]")
    if limit >= len(test):
        return test
    return test.select(range(limit), f"{test.name}[:{limit}]")


def _has_model(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (FINETUNE_META_FILE, "config.json", ADAPTER_CONFIG))


def _files_fingerprint(folder: Path) -> list:
    """Names, sizes and mtimes of a model folder's files: changes when it is retrained."""
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.iterdir() if p.is_file())


def _mean_std(values: Sequence[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "per_seed": list(values)}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None  # sample std over seeds
    return {"mean": float(np.mean(vals)), "std": std, "per_seed": list(values)}


# ----------------------------------------------------------------------------- the context of one comparison


@dataclass(frozen=True)
class StudySettings:
    """The run-wide choices every training and evaluation of one comparison shares."""

    k: int  # demonstrations (kNN, random, IPT)
    n_virtual: int  # soft-prompt tokens
    soft_train: TrainSettings  # its seed is replaced by each run's
    batch_size: int
    max_new_tokens: int  # generation
    progress: bool
    anchor_k: int = 8  # kNN prompting: anchors that vote
    anchors: AnchorConfig = field(default_factory=AnchorConfig)  # kNN prompting: the context and support of the anchors


@dataclass
class Study:
    """One comparison's loaded parts, built once by `open_study` and passed to every step."""

    lm: LM
    index: ExampleIndex
    name: str  # the index's name in the report
    index_ref: str  # what PipelineConfig.index names: the index folder, or an in-memory index's name
    embedder: Embedder
    builder: PromptBuilder  # the template every method is trained and evaluated with
    pool: Dataset  # training records (soft prompts and the reference)
    test: Dataset  # the test subset every method runs on
    test_source: str  # the test set's name before subsetting
    out: Path
    settings: StudySettings
    fingerprint: dict  # what every run shares (LM, template, pool, index, test): part of each cache key

    @property
    def template(self) -> Template:
        return self.builder.template


# ----------------------------------------------------------------------------- training


def _adapter(study: Study, method: str, spec: _Spec, seed: int, teacher: tuple[LM, dict] | None = None
             ) -> tuple[Path, dict]:
    """out/adapters/<method>-seed<s>: trained now, or reused when trained with these settings.
    `teacher`: (the reference, its fingerprint) for distilled methods."""
    folder = study.out / "adapters" / f"{method}-seed{seed}"
    k = study.settings.k if spec.train is SoftPromptMethod.IPT else 0
    config = SoftPromptConfig(method=spec.train, n_virtual=study.settings.n_virtual, k=k,
                              train=replace(study.settings.soft_train, seed=seed))
    settings = {"method": spec.train.value, "train_demos": spec.train_demos.value if spec.train_demos else None,
                "k": k, "n_virtual": study.settings.n_virtual, "train": asdict(config.train), "lr": config.lr,
                **{key: study.fingerprint[key] for key in ("lm", "template", "index", "train_pool")}}
    if spec.distill:
        if teacher is None:
            raise CompareError(f"{method} distils the fine-tuned reference, which this run has not loaded")
        settings["distill"] = {"reference": teacher[1], "alpha": 1.0}
    if folder.exists():
        stored = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else None
        if stored is None or stored["settings"] != jsonable(settings):
            raise CompareError(f"{folder} was trained with other settings than this run's; "
                               "delete it or choose another --out")
        return folder, {**stored, "reused": True}
    with _partial(folder, jsonable(settings)) as (partial, earlier_s):
        # an interrupted sitting left a checkpoint (one per evaluation) here: training resumes from it
        t0 = time.perf_counter()
        result = train_soft_prompt(study.lm, study.pool, config, builder=study.builder, index=study.index,
                                   embedder=study.embedder, out=partial, demos=spec.train_demos or SelectionMethod.KNN,
                                   teacher=teacher[0] if spec.distill else None, alpha=1.0,
                                   resume=earlier_s is not None)
        info = {"settings": settings, "train_seconds": time.perf_counter() - t0 + (earlier_s or 0.0),
                "trainable_params": sum(p.numel() for p in result.model.prompt_encoder.parameters()),
                "saved_params": None, "metrics": result.metrics}
        del result
        with safe_open(str(partial / ADAPTER_WEIGHTS), "pt") as f:
            info["saved_params"] = sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
        write_json(partial / RUN_FILE, info)
    return folder, {**jsonable(info), "reused": False}


@contextmanager
def _partial(folder: Path, settings: dict) -> Iterator[tuple[Path, float | None]]:
    """A soft prompt's training folder that outlives its sitting: adapters/.<name>.partial, with
    its settings beside it (.<name>.partial.json) and an flock (.<name>.partial.lock) so two compare
    runs sharing an --out never train one adapter at once. Yields (folder, seconds trained before
    when it holds a checkpoint of these settings, else None); when the block succeeds the folder
    is renamed to `folder`. A partial folder of other settings is discarded: it is unfinished work
    of this --out, never a user's file."""
    partial = folder.parent / f".{folder.name}.partial"
    stamp, lock = partial.with_name(partial.name + ".json"), partial.with_name(partial.name + ".lock")
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompareError(f"{folder} is being trained by another compare run on this --out; "
                               "let it finish (its result is then reused)") from None
        state = partial / CHECKPOINT_DIR / "state.json"
        same = stamp.is_file() and json.loads(stamp.read_text()) == settings
        if not same or not state.is_file():
            shutil.rmtree(partial, ignore_errors=True)
            write_json(stamp, settings)
        earlier_s = float(json.loads(state.read_text())["seconds"]) if same and state.is_file() else None
        yield partial, earlier_s
        os.replace(partial, folder)
        stamp.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock; the lock file stays (removing it would race a waiting run)


def _anchor_config(study: Study, seed: int) -> AnchorConfig:
    """Seed s draws the anchors' context demonstrations (and support sample) with seed base + s."""
    return replace(study.settings.anchors, seed=study.settings.anchors.seed + seed)


def _anchors(study: Study, seed: int = 0) -> Path:
    """out/anchors (seed s > 0: out/anchors-seed<s>): kNN prompting's anchors over the whole
    index, built once (they are refused at load, and rebuilt here, when the LM, template or
    index changed)."""
    folder = study.out / ("anchors" if seed == 0 else f"anchors-seed{seed}")
    try:
        Anchors.load(folder, lm=study.lm, builder=study.builder, index=study.index)
        return folder
    except AnchorError:
        pass
    anchors = build_anchors(study.lm, study.builder, study.index, _anchor_config(study, seed))
    anchors.save(folder, replace=True)
    return folder


def _relabelled_index(study: Study, teacher: tuple[LM, dict]) -> ExampleIndex:
    """The index with every record labelled by the reference (its zero-shot prediction, cached in
    out/teacher/), same vectors."""
    key = {"reference": teacher[1], "index_sha256": index_fingerprint(study.index), "labels": list(study.index.labels),
           "template": study.template.to_dict()}
    logp = pool_teacher_logprobs(teacher[0], study.builder, study.index.records, study.out / "teacher" / "logprobs.jsonl",
                                 jsonable(key), batch_size=study.settings.batch_size,
                                 progress=study.settings.progress)
    index = ExampleIndex.from_vectors(relabel(study.index.dataset, logp), study.index.vectors,
                                      study.index.manifest["embedder"], study.index.config)
    index.template = study.index.template
    return index


def _relabelled_anchors(study: Study, index: ExampleIndex, seed: int) -> Path:
    """kNN prompting's anchors over the relabelled `index`, in out/anchors-distill (seed s > 0:
    -seed<s>)."""
    folder = study.out / ("anchors-distill" if seed == 0 else f"anchors-distill-seed{seed}")
    try:
        Anchors.load(folder, lm=study.lm, builder=study.builder, index=index)
        return folder
    except AnchorError:
        pass
    gold = Anchors.load(_anchors(study, seed), lm=study.lm, builder=study.builder, index=study.index)
    ref_label, gold_label = ({r.id: r.output for r in ix.records} for ix in (index, study.index))
    if all(ref_label[i] == gold_label[i] for i in gold.context_ids):
        # the anchors' context reads the same labels, so every anchor's distribution is unchanged:
        # only the votes move to the reference's labels
        relabelled = replace(gold, labels=np.asarray([index.labels.index(r.output) for r in index.records], np.int64),
                             manifest={**gold.manifest, "index_sha256": index_fingerprint(index), "labelled_by": "reference"})
    else:
        relabelled = build_anchors(study.lm, study.builder, index, _anchor_config(study, seed))
    relabelled.save(folder, replace=True)
    return folder


def _readout(study: Study, folder: Path, index: ExampleIndex, source: str) -> dict:
    """A linear readout beside the anchors in `folder`, fitted to their labels (`source`: gold
    or the reference's) unless one for these anchors is there -> its info."""
    anchors = Anchors.load(folder, lm=study.lm, builder=study.builder, index=index)
    try:
        return LinearReadout.load(folder, anchors).info
    except AnchorError:
        fit_readout(anchors, label_source=source).save(folder)
        return LinearReadout.load(folder, anchors).info  # as a later run reads it (with its checksum)


def _reference(study: Study, reference: Path, config: FinetuneConfig) -> tuple[LM, dict]:
    """The fine-tuned reference: trained into `reference` unless a model is already there."""
    notes, trained = [], False
    if not _has_model(reference):
        if reference.exists() and any(reference.iterdir()):
            raise CompareError(f"{reference} holds files but no fine-tuned model; give an empty or new folder")
        with publish_dir(reference) as tmp:
            finetune(study.lm, study.pool, config, builder=study.builder, out=tmp)
        trained = True
    meta_file = reference / FINETUNE_META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("train_sha256") and meta["train_sha256"] != study.pool.sha256:
        notes.append(f"the reference in {reference} was trained on another pool than this run's soft prompts")
    if meta.get("lm") and meta["lm"] != study.lm.name:
        notes.append(f"the reference was fine-tuned from {meta['lm']!r}, this run's LM is {study.lm.name!r}")
    if meta.get("template") and meta["template"] != study.template.to_dict():
        notes.append("the reference was trained with another prompt template than this run's")
    tuned = load_finetuned(reference, base=study.lm)
    metrics = meta.get("metrics", {})
    info = {
        "path": str(reference), "trained_now": trained, "method": meta.get("method", "unknown"),
        "lm": meta.get("lm"), "train_sha256": meta.get("train_sha256"), "training": meta.get("training"),
        "trainable_params": metrics.get("trainable_params") or sum(p.numel() for p in tuned.model.parameters()),
        "train_seconds": metrics.get("seconds"), "metrics": metrics, "notes": notes,
        "fingerprint": _files_fingerprint(reference),
    }
    return tuned, info


# ----------------------------------------------------------------------------- evaluation


def _evaluate(study: Study, method: str, spec: _Spec, seed: int, *, lm: LM, adapter: Path | None,
              extra: dict, anchors: Path | None = None, index: ExampleIndex | None = None) -> dict:
    """One evaluation on the test subset, cached in out/runs/<method>-seed<s>.json (`index`: the
    relabelled index, in place of the study's)."""
    path = study.out / "runs" / f"{method}-seed{seed}.json"
    k = 0 if spec.demos is SelectionMethod.ZERO else study.settings.k
    fingerprint = _sha({**study.fingerprint, "method": method, "seed": seed, "k": k, "extra": extra,
                        "anchors": {"k": study.settings.anchor_k, "weight": spec.anchor_weight,
                                    "config": asdict(_anchor_config(study, seed))} if spec.anchor_weight else None,
                        "max_new_tokens": study.settings.max_new_tokens if study.test.kind is TaskKind.GENERATION else None})
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fingerprint:
            return {**cached, "reused": True}
    knn = {"anchors": str(anchors), "anchor_k": study.settings.anchor_k, "anchor_weight": spec.anchor_weight,
           "anchor_readout": "linear" if spec.readout else "knn"} if spec.anchor_weight else {}
    config = PipelineConfig(index=study.index_ref, lm=lm.name, template=study.template,
                            method=spec.demos, k=k, soft_prompt=str(adapter) if adapter else None, seed=seed,
                            batch_size=study.settings.batch_size, max_new_tokens=study.settings.max_new_tokens, **knn)
    engine = Engine.load(config, lm=lm, embedder=study.embedder, index=index or study.index)
    res = evaluate(engine, study.test, progress=study.settings.progress)
    run = {"method": method, "seed": seed, "k": k, "demos": spec.demos.value, "fingerprint": fingerprint,
           **{key: v for key, v in res.items() if key != "predictions"}}
    preds = res["predictions"]
    if study.test.kind is TaskKind.CLASSIFICATION:
        labels = list(study.index.labels)
        run["pred"] = [p["label"] for p in preds]
        run["probs"] = [[p["probs"][lab] for lab in labels] for p in preds]  # [n, L] in label order
    else:
        run["pred"] = [p["output"] for p in preds]
    run["demo_ids"] = [p["demo_ids"] for p in preds]
    write_json(path, run)
    return {**run, "reused": False}


def _example_scores(study: Study, run: dict) -> np.ndarray:
    """Per-example score in report points: correctness x 100, or best ROUGE-L (0-100)."""
    if study.test.kind is TaskKind.CLASSIFICATION:
        return 100.0 * (np.asarray(run["pred"]) == np.asarray([r.output for r in study.test.records]))
    refs = [refs for _, refs in group_references(study.test.records)]
    return 100.0 * np.asarray([max(rouge_l_pair(h, r) for r in rs) for h, rs in zip(run["pred"], refs)])


# ----------------------------------------------------------------------------- rows and checks


def _row(study: Study, method: str, spec: _Spec, runs: list[dict], ref: dict, train: list[dict] | None,
         ref_info: dict) -> dict:
    cls = study.test.kind is TaskKind.CLASSIFICATION
    metrics = ("accuracy", "macro_f1") if cls else ("rouge_l", "bleu")
    row = {"method": method, "title": spec.title, "eval_demos": spec.demos.value,
           "train_demos": spec.train_demos.value if spec.train_demos else ("none" if spec.train else None),
           "k": runs[0]["k"], "seeds": [r["seed"] for r in runs], "n": runs[0]["n"],
           **{m: _mean_std([r[m] for r in runs]) for m in metrics},
           "agreement": _mean_std([agreement(r["pred"], ref["pred"]) for r in runs]),
           "tv": _mean_std([mean_total_variation(r["probs"], ref["probs"]) for r in runs]) if cls else None,
           "queries_per_s": float(np.mean([r["queries_per_s"] for r in runs])),
           "eval_seconds": float(sum(r["seconds"] for r in runs)),
           "mean_prompt_tokens": float(np.mean([r["mean_prompt_tokens"] for r in runs]))}
    if method != CompareMethod.FINETUNED.value:  # paired over test examples, seeds averaged per example
        gap = _example_scores(study, ref) - np.mean([_example_scores(study, r) for r in runs], axis=0)  # [n] points
        agree = np.mean([np.asarray(r["pred"]) == np.asarray(ref["pred"]) for r in runs], axis=0)  # [n]
        row["gap_to_ref"] = {"mean": float(gap.mean()), "ci95": paired_bootstrap(gap)}
        row["agreement_ci95"] = paired_bootstrap(100.0 * agree)
    if method == CompareMethod.FINETUNED.value:
        train_s = [ref_info["train_seconds"]]
        row.update(trainable_params=ref_info["trainable_params"], train_seconds=_mean_std(train_s),
                   trained_now=int(ref_info["trained_now"]))
    elif train:
        row.update(trainable_params=train[0]["trainable_params"], saved_params=train[0]["saved_params"],
                   train_seconds=_mean_std([t["train_seconds"] for t in train]),
                   trained_now=sum(not t["reused"] for t in train),
                   train_steps=[t["metrics"]["steps"] for t in train],
                   final_train_loss=[t["metrics"].get("final_train_loss") for t in train])
        if spec.adapter != method:
            row["note"] = f"evaluates the {spec.adapter} soft prompts (no training of its own)"
            row["train_seconds"] = None
    else:
        row.update(trainable_params=0, train_seconds=None)
    # the compute this method costs: training (every seed, whenever it ran) + evaluation
    train_total = sum(v or 0.0 for v in row["train_seconds"]["per_seed"]) if row.get("train_seconds") else 0.0
    row["wall_seconds"] = train_total + row["eval_seconds"]
    return row


def _compare_pair(study: Study, runs_a: list[dict], runs_b: list[dict]) -> dict:
    """a - b in points, with a standard error from the test examples (paired, each method's
    per-example score averaged over its seeds) and from the seeds (their spread), combined."""
    a = np.mean([_example_scores(study, r) for r in runs_a], axis=0)  # [n]
    b = np.mean([_example_scores(study, r) for r in runs_b], axis=0)
    d = a - b
    se_test = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    var = lambda runs: float(np.var([_example_scores(study, r).mean() for r in runs], ddof=1)) if len(runs) > 1 else 0.0
    se_seed = math.sqrt(var(runs_a) / len(runs_a) + var(runs_b) / len(runs_b))
    se = math.sqrt(se_test ** 2 + se_seed ** 2)
    delta = float(d.mean())
    verdict = "better" if delta > 2 * se else "worse" if delta < -2 * se else "no clear difference"
    return {"delta": delta, "se": se, "se_test": se_test, "se_seed": se_seed, "verdict": verdict}


def _checks(study: Study, rows: dict[str, dict], runs: dict[str, list[dict]]) -> dict:
    unit = "accuracy points" if study.test.kind is TaskKind.CLASSIFICATION else "ROUGE-L points"
    metric = "accuracy" if study.test.kind is TaskKind.CLASSIFICATION else "rouge_l"
    scale = 100.0 if metric == "accuracy" else 1.0
    have = lambda *ms: all(m in runs for m in ms)
    pt, ipt, iptr = CompareMethod.PROMPT_TUNING.value, CompareMethod.IPT.value, CompareMethod.IPT_RANDOM.value
    out = {"unit": unit}

    if have(pt, ipt, iptr):
        knn, rnd = _compare_pair(study, runs[ipt], runs[pt]), _compare_pair(study, runs[iptr], runs[pt])
        holds = knn["verdict"] == "better" and rnd["verdict"] != "better"
        why = ("IPT beats PT with kNN demos and not with random ones" if holds else
               "IPT does not beat PT even with kNN demos" if knn["verdict"] != "better" else
               "IPT beats PT with random demos too")
        out["finding1"] = {"ipt_knn_minus_pt": knn, "ipt_random_minus_pt": rnd,
                           "verdict": "supported" if holds else "not supported", "why": why}
    else:
        out["finding1"] = {"verdict": "not checked", "why": f"needs methods {pt}, {ipt} and {iptr}"}

    if have(pt, ipt) and len(runs[pt]) > 1 and len(runs[ipt]) > 1:
        sd = {m: rows[m][metric]["std"] * scale for m in (pt, ipt, iptr) if m in rows}
        holds = sd[ipt] < sd[pt]
        out["finding2"] = {"std": sd, "seeds": len(runs[pt]), "verdict": "supported" if holds else "not supported",
                           "why": f"std over seeds: IPT {sd[ipt]:.2f} vs PT {sd[pt]:.2f} {unit}"
                                  + (f" (IPT with random demos {sd[iptr]:.2f})" if iptr in sd else "")}
    else:
        out["finding2"] = {"verdict": "not checked", "why": f"needs {pt} and {ipt} with 2+ seeds"}

    ref = CompareMethod.FINETUNED.value
    frozen = [m for m in FROZEN if m in rows]
    if frozen:
        def goal(m: str) -> dict:
            gap = (rows[ref][metric]["mean"] - rows[m][metric]["mean"]) * scale
            agree = rows[m]["agreement"]["mean"]
            return {"method": m, "gap": gap, "agreement": agree, "within_2_points": gap <= 2.0,
                    "agreement_at_least_90": agree >= 0.9, "gap_ci95": rows[m]["gap_to_ref"]["ci95"],
                    "agreement_ci95": rows[m]["agreement_ci95"], "pair": _compare_pair(study, runs[ref], runs[m])}
        each = [goal(m) for m in frozen]
        if metric == "accuracy":
            # the best frozen-LM method: one meeting both targets if any, else the highest agreement
            met_by = lambda g: g["within_2_points"] and g["agreement_at_least_90"]
            best = max(each, key=lambda g: (met_by(g), g["agreement"], -g["gap"]))
        else:
            # generation: the target is the ROUGE-L gap alone; agreement (identical outputs) is shown
            # but not required, since two good references for one input rarely match word for word
            met_by = lambda g: g["within_2_points"]
            best = max(each, key=lambda g: -g["gap"])
        out["goal"] = {**best, "verdict": "met" if met_by(best) else "not met", "needs_agreement": metric == "accuracy",
                       "all": {g["method"]: {k: g[k] for k in ("gap", "agreement")} for g in each}}
    else:
        out["goal"] = {"verdict": "not checked", "why": "needs a frozen-LM method"}
    return out


# ----------------------------------------------------------------------------- entry point


def run_compare(
    index: str | Path | ExampleIndex,
    test: Dataset | str | Path,
    *,
    out: Path,
    reference: Path | None = None,
    methods: Sequence[str] | None = None,
    seeds: int = DEFAULT_SEEDS,
    k: int = DEFAULT_K,
    lm: LM | str | None = None,
    indexes_dir: Path | None = None,
    train_pool: int | None = DEFAULT_TRAIN_POOL,
    test_limit: int | None = DEFAULT_TEST_LIMIT,
    n_virtual: int = DEFAULT_N_VIRTUAL,
    soft_train: TrainSettings | None = None,
    finetune_config: FinetuneConfig | None = None,
    template: Template | None = None,
    threads: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    anchor_k: int = 8,
) -> dict:
    """Run every method on the same test subset, compare each with the fine-tuned reference
    and write out/report.json, out/report.md and out/report.png; returns the report dict.

    index: a name under indexes_dir, a folder, or an ExampleIndex (its records are the training
    pool, subsampled to `train_pool` with seed 0, and the demonstrations). test: a Dataset, or a
    file / built-in name read with the index's kind and labels. reference: the
    fine-tuned model's folder, trained there by `finetune` when it holds no model yet (default
    out/reference). methods: CompareMethod values (default DEFAULT_METHODS; the reference is
    always run, but trained here only when it is among the methods asked for). soft_train: the soft prompts' TrainSettings (its seed is replaced by each of
    range(seeds)). threads: torch threads during the run, restored after (None: as load_lm set
    them; on a loaded shared CPU 1 thread was 3-7x faster than 2). max_new_tokens: generation."""
    t_start, load_start = time.perf_counter(), os.getloadavg()
    _check_options(seeds=seeds, k=k, train_pool=train_pool, test_limit=test_limit, n_virtual=n_virtual,
                   max_new_tokens=max_new_tokens, threads=threads, anchor_k=anchor_k)
    chosen = _methods(methods)
    settings = StudySettings(k=k, n_virtual=n_virtual, soft_train=soft_train or default_soft_train(),
                             batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                             anchor_k=anchor_k)
    finetune_config = finetune_config or default_finetune()
    out = Path(out)
    reference = Path(reference) if reference else out / "reference"
    check_out_dir(out)
    if methods is not None and CompareMethod.FINETUNED.value not in methods and not _has_model(reference):
        # training it takes the longest of all (13 minutes on 2 cores): only when asked for
        raise CompareError(f"no fine-tuned reference in {reference}: pass --reference with one (icl finetune), "
                           f"or add '{CompareMethod.FINETUNED.value}' to the methods to train it here")
    threads_before = torch.get_num_threads()
    study = open_study(index, test, out=out, lm=lm, indexes_dir=indexes_dir, template=template,
                       train_pool=train_pool, test_limit=test_limit, settings=settings)
    if study.test.kind is TaskKind.GENERATION:  # kNN prompting votes over labels: nothing to vote on
        asked = [m for m in chosen if m in LABELS_ONLY]
        if asked and methods is not None:
            raise CompareError(f"{asked[0].value} needs a classification index; this one holds generation data")
        chosen = [m for m in chosen if m not in LABELS_ONLY]
    if threads:
        torch.set_num_threads(threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        ref_run, ref_info, ref_seconds, tuned = _run_reference(study, reference, finetune_config, threads)
        runs, trained, timings = _run_methods(study, chosen, seeds, ref_run, (tuned, ref_info["fingerprint"]))
        timings[CompareMethod.FINETUNED.value] = ref_seconds
        rows = {m: _row(study, m, _SPECS[CompareMethod(m)], runs[m], ref_run, trained.get(m), ref_info) for m in runs}
        for m, row in rows.items():
            row["this_run_seconds"] = timings[m]  # what this invocation spent (reused work is not redone)
        requested = {"methods": [m.value for m in chosen], "seeds": seeds, "train_pool_requested": train_pool,
                     "test_limit": test_limit, "finetune": {**asdict(finetune_config), "lr": finetune_config.lr}}
        report = _report(study, requested, [rows[m.value] for m in chosen], runs, ref_info, load_start)
        report["checks"] = _checks(study, rows, runs)
        report["wall_seconds"] = time.perf_counter() - t_start
        write_report(out, report, format_report(report), json_name=REPORT_JSON, md_name=REPORT_MD)
        _plot(report, out / REPORT_PNG)
        return jsonable(report)
    finally:
        torch.set_num_threads(threads_before)


def _check_options(**options) -> None:
    """The numeric options' lower bounds; None switches an option off (train_pool, test_limit, threads)."""
    why = {"k": " (kNN, random and IPT need demonstrations)"}
    least = {"train_pool": 2}
    for name, value in options.items():
        if value is not None and value < least.get(name, 1):
            raise CompareError(f"{name} must be >= {least.get(name, 1)}{why.get(name, '')}, got {value}")


def open_study(index: str | Path | ExampleIndex, test: Dataset | str | Path, *, out: Path, lm: LM | str | None,
               indexes_dir: Path | None, template: Template | None, train_pool: int | None,
               test_limit: int | None, settings: StudySettings) -> Study:
    """Load the index once, the test set against it (kind, labels), the LM, the template
    (resolve.py's precedence), the training pool and the test subset."""
    idx, index_name, folder = _load_index(index, indexes_dir)
    if not isinstance(test, Dataset):  # a file or built-in name, read with the index's kind and labels
        test = load_dataset(test, kind=idx.kind, labels=idx.labels or None)
    if test.kind is not idx.kind:
        raise CompareError(f"the test set is {test.kind.value} data but the index holds {idx.kind.value}")
    if test.kind is TaskKind.CLASSIFICATION:
        unknown = sorted({r.output for r in test.records} - set(idx.labels))
        if unknown:
            raise CompareError(f"test labels {unknown} are not among the index's labels {list(idx.labels)}")
    if len(test) == 0:
        raise CompareError("the test set is empty")
    template = resolve_template(idx.kind, given=template, stored=idx.template, dataset=idx.manifest.get("dataset"))
    lm = lm if isinstance(lm, LM) else load_lm(str(lm or DEFAULT_LM))
    pool = idx.dataset.subsample(train_pool, 0) if train_pool else idx.dataset
    test_set = _test_subset(test, test_limit)
    fingerprint = {"lm": lm.name, "template": template.to_dict(), "train_pool": pool.sha256,
                   "index": {key: idx.manifest.get(key) for key in ("dataset_sha256", "count", "embedder")},
                   "test": test_set.sha256}
    return Study(lm=lm, index=idx, name=index_name, index_ref=str(folder) if folder else index_name,
                 embedder=get_embedder(idx.manifest["embedder"]), builder=PromptBuilder(template, lm.tokenizer, idx.labels),
                 pool=pool, test=test_set, test_source=test.name, out=out, settings=settings, fingerprint=fingerprint)


def _run_reference(study: Study, reference: Path, config: FinetuneConfig, threads: int | None):
    """Train (or reuse) the fine-tuned reference and evaluate it -> (run, info, seconds, the
    reference LM)."""
    t0 = time.perf_counter()
    tuned, ref_info = _reference(study, reference, config)
    if threads:  # load_lm (full fine-tuning) sets the thread count again
        torch.set_num_threads(threads)
    ref_run = _evaluate(study, CompareMethod.FINETUNED.value, _SPECS[CompareMethod.FINETUNED], 0, lm=tuned,
                        adapter=None, extra={"reference": ref_info["fingerprint"]})
    return ref_run, ref_info, time.perf_counter() - t0, tuned


def _run_methods(study: Study, chosen: list[CompareMethod], seeds: int, ref_run: dict, teacher: tuple[LM, dict]):
    """Every chosen method, each seed (training its soft prompt first when it has one; the
    distilled ones learn from `teacher`, the reference and its fingerprint) -> (runs, training
    infos, seconds) per method."""
    runs: dict[str, list[dict]] = {}
    trained: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    relabelled = None  # the index relabelled by the reference, made once for every *_distill row
    for m in chosen:
        if m is CompareMethod.FINETUNED:
            runs[m.value] = [ref_run]
            continue
        spec, t0 = _SPECS[m], time.perf_counter()
        runs[m.value], trained[m.value] = [], []
        index, extra = None, {}
        if spec.relabel:
            if relabelled is None:
                relabelled = _relabelled_index(study, teacher)
            index = relabelled
            extra = {"labelled_by": teacher[1]}
        for seed in range(seeds) if spec.seeded else [0]:
            anchors = None
            if spec.anchor_weight:  # seed s: anchors whose context is drawn with seed s
                anchors = _relabelled_anchors(study, index, seed) if spec.relabel else _anchors(study, seed)
            if spec.readout:
                fitted = _readout(study, anchors, index or study.index, "reference" if spec.relabel else "gold")
                extra["readout"] = {k: v for k, v in fitted.items() if k != "anchors_key"}
            adapter, info = _adapter(study, spec.adapter, spec, seed, teacher) if spec.train else (None, None)
            if info:
                trained[m.value].append(info)
            runs[m.value].append(_evaluate(study, m.value, spec, seed, lm=study.lm, adapter=adapter, anchors=anchors,
                                           extra={"adapter": info["settings"] if info else None, **extra}, index=index))
        timings[m.value] = time.perf_counter() - t0
    return runs, trained, timings


def _report(study: Study, requested: dict, rows: list[dict], runs: dict, ref_info: dict, load_start) -> dict:
    """report.json's content (checks and wall time are added by the caller)."""
    st, test, cls = study.settings, study.test, study.test.kind is TaskKind.CLASSIFICATION
    return {
        "format_version": FORMAT_VERSION,
        "name": study.name,
        "kind": test.kind.value,
        "metric": "accuracy" if cls else "rouge_l",
        "labels": list(study.index.labels),
        "settings": {
            "methods": requested["methods"], "seeds": requested["seeds"], "k": st.k, "n_virtual": st.n_virtual,
            "train_pool": len(study.pool), "train_pool_requested": requested["train_pool_requested"],
            "train_pool_sha256": study.pool.sha256, "test_limit": requested["test_limit"],
            "test_n": runs[CompareMethod.FINETUNED.value][0]["n"], "test_records": len(test),
            "test_sha256": test.sha256, "test_source": study.test_source, "soft_train": asdict(st.soft_train),
            "finetune": requested["finetune"], "template": study.template.to_dict(), "lm": study.lm.name,
            "index": study.name, "index_count": study.index.manifest.get("count"), "embedder": study.embedder.name,
            "batch_size": st.batch_size, "max_new_tokens": st.max_new_tokens, "defaults_basis": DEFAULTS_BASIS,
            "anchor_k": st.anchor_k, "anchors": asdict(st.anchors),
            "std": "sample standard deviation (ddof=1) over seeds; None for one run",
        },
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads(),
                    "load_average_start": list(load_start), "load_average_end": list(os.getloadavg())},
        "reference": {key: v for key, v in ref_info.items() if key != "fingerprint"},
        "test": {"ids": [r.id for r in test.records]} | (
            {"gold": [r.output for r in test.records]} if cls
            else {"inputs": [i for i, _ in group_references(test.records)]}),
        "rows": rows,
        "runs": {m: [{key: r[key] for key in ("seed", "k", "demos", "pred", "probs", "seconds", "reused")
                      if key in r} for r in rs] for m, rs in runs.items()},
    }


# ----------------------------------------------------------------------------- report.md and the plot


def _ms(d: dict | None, scale=1.0, spec=".1f") -> str:
    if not d or d["mean"] is None:
        return "–"
    return fmt(d["mean"] * scale, spec) + ("" if d["std"] is None else f" ± {fmt(d['std'] * scale, spec)}")


def _params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def format_report(report: dict) -> str:
    """report.md: settings, the table, Sun et al.'s two findings and the goal line with numbers."""
    s, cls = report["settings"], report["kind"] == "classification"
    main, scale = ("accuracy", 100.0) if cls else ("rouge_l", 1.0)
    second = "macro_f1" if cls else "bleu"
    head = ["method", "demos (train → test)", f"{main} (%)" if cls else "ROUGE-L", "macro-F1 (%)" if cls else "BLEU",
            "agreement w/ ref (%)", "TV to ref", "trainable", "train s/seed", "q/s", "compute s"]
    st = s["soft_train"]
    steps = f"{st['max_steps']} steps" if st["max_steps"] else f"{st['epochs']} epochs"
    # prefix tuning trains through an MLP; only its output (the key/values) is kept
    saved = lambda r: f" (saved {_params(r['saved_params'])})" if r.get("saved_params") not in (
        None, r["trainable_params"]) else ""
    lines = [f"# Approximation report: {report['name']}", "",
             f"{s['test_n']} test examples ({s['test_source']}), LM `{s['lm']}`, k = {s['k']}, "
             f"{s['seeds']} seed(s) for seeded methods, training pool {s['train_pool']} records of the index "
             f"({s['index_count']}), {s['n_virtual']} virtual tokens, soft prompts {steps} "
             f"of batch {st['batch_size']}, reference {report['reference']['method']} fine-tuning "
             f"({'trained in this run' if report['reference']['trained_now'] else 'reused'}: "
             f"`{report['reference']['path']}`). Values are mean ± sample std over seeds.", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in report["rows"]:
        demos = f"{r['train_demos']} → {r['eval_demos']}" if r["train_demos"] else f"– → {r['eval_demos']}"
        lines.append("| " + " | ".join([
            r["title"], demos, _ms(r[main], scale), _ms(r[second], scale),
            _ms(r["agreement"], 100.0), _ms(r["tv"], 1.0, ".3f") if r["tv"] else "–",
            _params(r["trainable_params"]) + saved(r), _ms(r["train_seconds"], 1.0, ".0f"),
            fmt(r["queries_per_s"], ".2f"), fmt(r["wall_seconds"], ".0f")]) + " |")
    c, unit = report["checks"], report["checks"]["unit"]
    lines += ["", "**kNN + soft prompt** is the `ipt` row: a prompt-tuning soft prompt trained with each "
              "training example's k nearest demonstrations and evaluated with the test input's k nearest "
              "(Sun et al.'s instruction prompt tuning).", "", "## Sun et al. (2023), checked on these numbers", ""]
    f1 = c["finding1"]
    if "ipt_knn_minus_pt" in f1:
        a, b = f1["ipt_knn_minus_pt"], f1["ipt_random_minus_pt"]
        lines.append(
            f"1. *IPT beats prompt tuning only with similar (kNN) demonstrations.* IPT(kNN) − PT = "
            f"{a['delta']:+.1f} ± {a['se']:.1f} {unit} ({a['verdict']}); IPT(random) − PT = "
            f"{b['delta']:+.1f} ± {b['se']:.1f} ({b['verdict']}). **{f1['verdict'].capitalize()}**: {f1['why']}.")
    else:
        lines.append(f"1. *IPT beats prompt tuning only with kNN demonstrations*: not checked ({f1['why']}).")
    f2 = c["finding2"]
    if "std" in f2:
        lines.append(f"2. *IPT has lower variance across seeds than prompt tuning.* {f2['why']} over "
                     f"{f2['seeds']} seeds. **{f2['verdict'].capitalize()}** (with {f2['seeds']} seeds a "
                     "standard deviation is itself very uncertain: weak evidence either way).")
    else:
        lines.append(f"2. *IPT has lower variance across seeds*: not checked ({f2['why']}).")
    lines.append("")
    lines.append("± on a difference: its standard error from the test examples (paired) and the seeds; "
                 "'better'/'worse' when it exceeds 2 standard errors.")
    g = c["goal"]
    lines += ["", "## Goal: the best frozen-LM method within 2 points of the fine-tuned reference, ≥ 90% agreement"
              if g.get("needs_agreement", True) else "## Goal: the best frozen-LM method within 2 ROUGE-L points of "
              "the fine-tuned reference (agreement, identical outputs, is shown but not part of it)", ""]
    if "gap" in g:
        lo, hi = g["gap_ci95"]
        alo, ahi = g["agreement_ci95"]
        lines.append(
            f"Best frozen-LM method: `{g['method']}`. Reference − it = {g['gap']:+.1f} {unit} "
            f"({'within' if g['within_2_points'] else 'not within'} 2; paired-bootstrap 95% interval "
            f"[{lo:+.1f}, {hi:+.1f}]), agreement {100 * g['agreement']:.1f}% "
            + (f"({'at least' if g['agreement_at_least_90'] else 'below'} 90%; " if g.get("needs_agreement", True) else "(")
            + f"95% interval [{alo:.1f}, {ahi:.1f}]). "
            f"**Goal {g['verdict']}.**" + _unconfirmed(g))
        lines += ["", "| method | gap to reference | 95% interval | agreement (%) | 95% interval |", "|---|---:|---:|---:|---:|"]
        for r in report["rows"]:
            if "gap_to_ref" in r:
                (a, b), (c1, c2) = r["gap_to_ref"]["ci95"], r["agreement_ci95"]
                lines.append(f"| {r['method']} | {r['gap_to_ref']['mean']:+.1f} | [{a:+.1f}, {b:+.1f}] | "
                             f"{100 * r['agreement']['mean']:.1f} | [{c1:.1f}, {c2:.1f}] |")
        lines += ["", "Intervals resample the test examples (2,000 paired bootstrap draws; a seeded method's "
                  "per-example score is its mean over seeds), so they leave the spread over seeds out."]
    else:
        lines.append(f"Not checked ({g['why']}).")
    m = report["machine"]
    lines += ["", "## Run", "",
              f"- machine: {m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s), torch {m['torch']}, "
              f"{m['platform']}; load average {m['load_average_start'][0]:.1f} at start, "
              f"{m['load_average_end'][0]:.1f} at end; CUDA: {m['cuda'] or 'none'}",
              f"- wall time of this invocation: {report['wall_seconds']:.0f} s; per method (this invocation, "
              "reused training and evaluations are not redone): "
              + ", ".join(f"{r['method']} {r['this_run_seconds']:.0f} s" for r in report["rows"]),
              f"- defaults: {s['defaults_basis']}",
              f"- soft prompt training: {json.dumps(s['soft_train'], sort_keys=True)}",
              _reference_line(report["reference"], s["finetune"])]
    for note in report["reference"].get("notes", []):
        lines.append(f"- note: {note}")
    for r in report["rows"]:
        if r.get("note"):
            lines.append(f"- {r['method']}: {r['note']}")
    return "\n".join(lines) + "\n"


def _reference_line(ref: dict, requested: dict) -> str:
    """What the reference in the table was trained with: its own record when it was reused."""
    if ref.get("trained_now"):
        return f"- reference training (this run): {json.dumps(requested, sort_keys=True)}"
    m = ref.get("metrics") or {}
    seen = f", {m['examples_seen']} examples seen" if "examples_seen" in m else ""
    return (f"- reference training (reused, from its icl_finetune.json): {m.get('steps')} steps{seen}, best held-out "
            f"loss at step {m.get('best_step')} (held-out accuracy {fmt(m.get('best_eval_accuracy'), '.3f')}), "
            f"{fmt(m.get('seconds'), '.0f')} s; settings {json.dumps(ref.get('training'), sort_keys=True)}")


def _unconfirmed(g: dict) -> str:
    """A goal met on the mean whose 95% intervals reach past a target: what the test set cannot confirm."""
    past = []
    if g["gap_ci95"][1] > 2.0:
        past.append(f"the gap's reaches {g['gap_ci95'][1]:+.1f}, past 2 points")
    if g.get("needs_agreement", True) and g["agreement_ci95"][0] < 90.0:
        past.append(f"the agreement's reaches down to {g['agreement_ci95'][0]:.1f}%, below 90%")
    if g["verdict"] != "met" or not past:
        return ""
    return f" Its 95% intervals do not confirm it: {' and '.join(past)}."


def _plot(report: dict, path: Path) -> None:
    """Bars (mean ± std over seeds): the task metric with the reference's level and the goal
    band, agreement with the reference (90% line), and TV distance to it (classification)."""
    plt = pyplot()
    cls = report["kind"] == "classification"
    main, scale = ("accuracy", 100.0) if cls else ("rouge_l", 1.0)
    rows = report["rows"]
    names = [r["method"] for r in rows]
    panels = [(main, scale, f"{main} (%)" if cls else "ROUGE-L"), ("agreement", 100.0, "agreement with reference (%)")]
    if cls:
        panels.append(("tv", 1.0, "mean TV distance to reference"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    ref = next(r for r in rows if r["method"] == CompareMethod.FINETUNED.value)
    for ax, (key, sc, title) in zip(np.atleast_1d(axes), panels):
        mean = [(r[key]["mean"] or 0.0) * sc for r in rows]
        std = [(r[key]["std"] or 0.0) * sc for r in rows]
        ax.bar(range(len(rows)), mean, yerr=std, capsize=3,
               color=["C3" if n == ref["method"] else "C0" for n in names])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if key == main:
            level = ref[key]["mean"] * sc
            ax.axhline(level, color="C3", ls="--", lw=1, label="reference")
            ax.axhspan(level - 2, level, color="C3", alpha=0.12, label="within 2 points")
            ax.legend(fontsize=7)
        elif key == "agreement":
            ax.axhline(90, color="k", ls=":", lw=1, label="90%")
            ax.legend(fontsize=7)
    fig.suptitle(f"{report['name']}: {report['settings']['test_n']} test examples", fontsize=10)
    save_figure(fig, path)
