"""The library functions behind the front ends (the CLI, later a service): one per command,
returning JSON-ready dicts, or the report text a study wrote. Nothing here parses flags, formats
or prints: presentation lives with the CLI (cli_format.py).

The query functions (classify, generate, evaluate_file) take a loaded Engine or a
PipelineConfig; a config goes through a small cache of engines (engines.py), so a long-lived
process loads the LM, embedder and index once.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from . import ray_jobs, shards, store
from .adapters import FINETUNE_META_FILE, load_finetuned
from .atomic import check_out_dir
from .data import load_dataset
from .embed import DEFAULT_EMBEDDER, canonical_name, get_embedder
from .engines import get_engine
from .evaluate import evaluate
from .index import (ExampleIndex, IndexConfig, IndexType, check_writable, delete_index, index_path, index_version,
                    list_indexes, update_index)
from .knn_prompt import AnchorConfig
from .knn_prompt import build_anchors as make_anchors
from .readout import AnchorReadout, fit_readout
from .lm import DEFAULT_LM, load_lm
from .pipeline import Engine, PipelineConfig
from .progress import Progress
from .prompt import PromptBuilder, Template
from .registry import builtin_template
from .resolve import resolve_template
from .select import SelectionMethod, select_demonstrations
from .template_search import search_templates
from .templates import data_template, template_candidates
from .studies import compare as cmp
from .studies import experiments
from .studies.bounds import theory_table
from .studies.experiments.retrieval import engine_predictor
from .adapters import META_FILE as SOFT_META_FILE
from .train.distill import load_teacher
from .train.finetune import FinetuneConfig, finetune
from .train.loop import TrainSettings, check_train_out
from .train.soft_prompt import SoftPromptConfig, train_soft_prompt

__all__ = [
    "UpdateError", "DEFAULT_EMBEDDER", "DEFAULT_LM", "build_index", "index_config", "ray_options", "add_to_index", "remove_from_index",
    "search_index_template", "index_info", "delete_index_folder", "list_index_infos", "search", "search_loaded",
    "make_config", "classify", "generate", "evaluate_file", "classify_file", "generate_file", "run_demo", "build_anchors", "tune",
    "finetune_reference", "compare", "bounds_theory", "bounds_run",
]

SEARCH_FILE = "template_search.json"  # the template search's table, stored with the index


def build_index(data: str, name: str, *, text_field=None, label_field=None, embedder: str = DEFAULT_EMBEDDER,
                index_type: IndexType = IndexType.FLAT, template: Path | None = None,
                indexes_dir: Path | None = None, force: bool = False, auto_template: bool = False,
                lm: str = DEFAULT_LM, search_k: int = 8, search_examples: int = 150, id_field: str | None = None,
                ray: "ray_jobs.RayOptions | None" = None, index_settings: dict | None = None) -> dict:
    """Load `data`, embed it and save the index as `name` (replacing an existing index only with
    `force`); returns the manifest, with the template chosen and any notes about it.

    The template stored with the index: `template` (a JSON file) if given; else with
    `auto_template` the best of a few candidates on a held-out slice of the data (template_search);
    else the built-in dataset's; else one made from the data (templates.data_template).
    `id_field`: record ids from that field of the file (see add_to_index), remembered by the index.
    `ray`: read and embed on Ray (ray_jobs): the same index as without it, made by an actor pool;
    an ivfpq_disk index streams the vectors to disk (ray_jobs.embed_to_file), never holding them all.
    `index_settings`: IndexConfig's settings for `index_type` ({"nlist": 64, "rerank": 16}); one
    the kind does not take is a ValueError, before any work.
    Everything that can be checked is checked before embedding."""
    config = index_config(index_type, index_settings)
    folder = index_path(name, indexes_dir, for_write=True)
    check_writable(folder, replace=force)
    store.remove_dead_scratch(folder.parent)  # what killed streaming builds left here (their locks are free)
    given = Template.from_json(template) if template else None
    streamed = ray is not None and config.index_type is IndexType.IVFPQ_DISK
    # a streaming build's vectors and lists wait in a locked scratch folder beside the index until
    # it is published (save moves the vectors in, copies the lists compacted); removed after
    with store.scratch_folder(folder.parent, folder.name) if streamed else nullcontext() as scratch:
        if streamed:  # an ivfpq_disk pool on Ray: its vectors stream to disk, never all in the driver's RAM
            dataset, vectors = ray_jobs.embed_to_file(data, scratch / "vectors.f32", embedder=embedder, options=ray,
                                                      text_field=text_field, label_field=label_field, id_field=id_field)
        elif ray is not None:  # reading and embedding are one distributed step; the checks below follow it
            dataset, vectors = ray_jobs.read_and_embed(data, embedder=embedder, options=ray, text_field=text_field,
                                                       label_field=label_field, id_field=id_field)
        else:
            dataset = load_dataset(data, text_field=text_field, label_field=label_field, id_field=id_field)
        builtin = None if Path(str(data)).exists() else builtin_template(str(data))
        default, notes = data_template(dataset)  # also refuses labels that read the same as words
        model = load_lm(lm) if auto_template and given is None else None  # a bad --lm fails before embedding
        if ray is not None:
            emb = get_embedder(embedder) if auto_template else None  # the search embeds its queries here
            index = ExampleIndex.from_vector_file(dataset, vectors, canonical_name(embedder), config,
                                                  scratch / "lists.ivfdata", move=True) if streamed \
                else ExampleIndex.from_vectors(dataset, vectors, canonical_name(embedder), config)
        else:
            emb = get_embedder(embedder)
            index = ExampleIndex.build(dataset, emb, config)
        if id_field:
            index.manifest["id_field"] = id_field
        extras, search = {}, None
        if given is not None:
            tpl, source = given, "given"
        elif auto_template:
            candidates = {**({"built-in": builtin} if builtin else {}), **template_candidates(dataset)}
            search = search_templates(index, model, emb, k=search_k, n_validation=search_examples,
                                      candidates=candidates)
            tpl, source, notes = search.template, f"search: {search.best}", notes + search.notes
            extras[SEARCH_FILE] = search.to_dict()
        elif builtin is not None:
            tpl, source, notes = builtin, "built-in", []
        else:
            tpl, source = default, "made from the data"
        # the index stores its default template; the index itself never formats
        index.save(folder, replace=force, template=tpl.to_dict(), extras=extras)
    info = index_info(name, indexes_dir=indexes_dir)
    return {**info, "template_source": source, "template_notes": notes,
            **({"template_search": search.to_dict()} if search else {})}


def index_config(index_type: IndexType | str, settings: dict | None = None) -> IndexConfig:
    """The IndexConfig of a build: `settings` left out (None values) take the kind's defaults."""
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    unknown = sorted(set(given) - set(IndexConfig.__dataclass_fields__) - {"index_type", "use_gpu"})
    if unknown or not set(given).isdisjoint({"index_type", "use_gpu"}):
        raise ValueError(f"unknown index settings {unknown or sorted(given)}")
    return IndexConfig(index_type=index_type, **given)


def ray_options(enabled: bool, *, address: str | None = None, workers: int = 2) -> "ray_jobs.RayOptions | None":
    """The Ray options of a command's --ray flags, None without --ray; checks that Ray is
    installed first (RayMissingError: one line with the install command)."""
    if not enabled:
        if address:
            raise ValueError("--address needs --ray")
        return None
    ray_jobs.require_ray()
    return ray_jobs.RayOptions(address=address, workers=workers)


class UpdateError(ValueError):
    """Data that cannot go into an existing index as it is (another embedder, template or fields)."""


def add_to_index(name: str, data: str, *, text_field=None, label_field=None, id_field=None,
                 embedder: str | None = None, template: Path | None = None, indexes_dir: Path | None = None) -> dict:
    """Upsert the records of `data` into index `name` as a new version (index.update_index):
    a row whose id is in the index replaces it; only texts the index does not hold are embedded.

    Ids are content hashes unless the file has an id field (`id_field`, default the one the
    index was built with): without one, re-adding a record changes nothing and a changed label
    is a new record. The data must fit the index: its embedder (`embedder`, when given), its
    template (`template`, when given), its labels, and the field names its template was made from
    (unless `text_field` / `label_field` name the fields explicitly)."""
    folder = index_path(name, indexes_dir, for_write=True)
    index = ExampleIndex.load(folder, use_gpu=False)
    m = index.manifest
    if embedder is not None and canonical_name(embedder) != m["embedder"]:
        raise UpdateError(f"index {name!r} was built with embedder {m['embedder']!r}, not {canonical_name(embedder)!r}")
    if template is not None:
        stored = resolve_template(index.kind, stored=index.template, dataset=m.get("dataset")).to_dict()
        if Template.from_json(template).to_dict() != stored:
            raise UpdateError(f"{template} is not index {name!r}'s template; an update keeps the index's template "
                              "(rebuild with --force to change it)")
    dataset = load_dataset(data, kind=index.kind, text_field=text_field, label_field=label_field,
                           labels=index.labels or None, id_field=id_field or m.get("id_field"))
    have, got = tuple(m.get("fields") or ()), tuple(dataset.fields)
    if have and got and have != got and text_field is None and label_field is None:  # named fields: the user's call
        raise UpdateError(f"{data}: fields {'/'.join(got)} are not index {name!r}'s {'/'.join(have)}, which its "
                          "template reads; rename them, or name them with --text-field/--label-field to add them anyway")
    result = update_index(folder, records=dataset.records, index=index,
                          embed=lambda texts: get_embedder(m["embedder"]).encode(texts))
    return {"name": name, "path": str(folder), **result}


def remove_from_index(name: str, ids, *, indexes_dir: Path | None = None) -> dict:
    """Remove the records (or rows) with these ids from index `name`, as a new version."""
    ids = [i for i in ids if i]
    if not ids:
        raise UpdateError("no ids to remove")
    folder = index_path(name, indexes_dir, for_write=True)
    return {"name": name, "path": str(folder), **update_index(folder, remove_ids=ids)}


def search_index_template(name: str, *, lm: str = DEFAULT_LM, k: int = 8, examples: int = 150,
                          indexes_dir: Path | None = None) -> dict:
    """Run the template search on an existing index and store the winner with it (a new version
    of the index, published like a rebuild); returns the search's table."""
    folder = index_path(name, indexes_dir, for_write=True)
    index = ExampleIndex.load(folder)
    dataset = index.dataset
    candidates = template_candidates(dataset)
    if index.template:  # the template it has now competes too, and wins ties
        candidates = {"current": Template.from_dict(index.template), **candidates}
    search = search_templates(index, load_lm(lm), get_embedder(index.manifest["embedder"]), k=k,
                              n_validation=examples, candidates=candidates)
    index.manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    index.save(folder, replace=True, template=search.template.to_dict(), extras={**index.extras,
                                                                                  SEARCH_FILE: search.to_dict()})
    return {"name": name, "path": str(folder), **search.to_dict()}


def index_info(name: str, *, indexes_dir: Path | None = None) -> dict:
    folder = index_path(name, indexes_dir)
    index = ExampleIndex.load(folder)
    return {"name": name, "path": str(folder), **index.manifest}


def delete_index_folder(name: str, *, indexes_dir: Path | None = None) -> dict:
    """Remove index `name` (only a folder this engine made); returns what was removed."""
    folder = index_path(name, indexes_dir, for_write=True)
    try:
        count = ExampleIndex.load(folder).manifest["count"]
    except ValueError:  # a damaged index can be deleted too; a foreign folder is refused below
        count = None
    delete_index(folder)
    return {"name": name, "path": str(folder), "count": count, "deleted": True}


def list_index_infos(*, indexes_dir: Path | None = None) -> list[dict]:
    """One row per index under the indexes dir; an unreadable one says why instead of its counts."""
    rows = []
    for folder in list_indexes(indexes_dir):
        try:
            m = ExampleIndex.load(folder).manifest
            rows.append({"name": folder.name, "count": m["count"], "kind": m["kind"], "embedder": m["embedder"],
                         "created": m.get("updated", m["created"])})
        except ValueError as e:
            rows.append({"name": folder.name, "error": str(e)})
    return rows


def search(name: str, query: str, *, k: int = 8, mmr_lambda: float | None = None,
           indexes_dir: Path | None = None) -> list[dict]:
    index = ExampleIndex.load(index_path(name, indexes_dir))
    return search_loaded(index, get_embedder(index.manifest["embedder"]), query, k=k, mmr_lambda=mmr_lambda)


def search_loaded(index: ExampleIndex, embedder, query: str, *, k: int = 8,
                  mmr_lambda: float | None = None) -> list[dict]:
    """`search` over an index and embedder already in memory (a long-lived service's)."""
    [qv] = embedder.encode([query])
    method = SelectionMethod.KNN if mmr_lambda is None else SelectionMethod.MMR
    sel = select_demonstrations(index, qv, method=method, k=k, query_text=query,
                                mmr_lambda=1.0 if mmr_lambda is None else mmr_lambda)
    # most similar first for display (prompt order puts it last)
    rows = [{"id": index.records[i].id, "score": float(s), "text": index.records[i].input,
             "label": index.records[i].output} for i, s in zip(sel.ids, sel.scores)]
    return sorted(rows, key=lambda r: -r["score"])


def make_config(name: str, *, template: Path | None = None, soft_prompt: Path | None = None,
                indexes_dir: Path | None = None, **kw) -> PipelineConfig:
    return PipelineConfig(
        index=name, indexes_dir=str(indexes_dir) if indexes_dir else None,
        template=Template.from_json(template) if template else None,
        soft_prompt=str(soft_prompt) if soft_prompt else None, **kw)


def classify(engine: Engine | PipelineConfig, text: str) -> dict:
    if not text.strip():
        raise ValueError("the query is empty")
    [pred] = get_engine(engine).classify([text])
    return asdict(pred)


def generate(engine: Engine | PipelineConfig, input: str) -> dict:
    if not input.strip():
        raise ValueError("the input is empty")
    [gen] = get_engine(engine).generate([input])
    return asdict(gen)


def evaluate_file(engine: Engine | PipelineConfig, test: str, *, limit=None, text_field=None,
                  label_field=None, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """Evaluate on a test file. `ray`: the queries are answered by the Ray engine pool
    (ray_jobs.PoolLabeller; a config, not a loaded engine); the metrics are the same."""
    # the test file is checked before an LM loads (seconds to minutes): a mistake there fails fast
    index = engine.index if isinstance(engine, Engine) else ExampleIndex.load(index_path(engine.index,
                                                                                          engine.indexes_dir))
    # the index's label list: a test label the index does not know is refused by the loader
    test_set = load_dataset(test, kind=index.kind, text_field=text_field, label_field=label_field,
                            labels=index.labels or None)
    if ray is not None:
        if isinstance(engine, Engine):
            raise ValueError("evaluating on Ray takes a PipelineConfig (each actor loads its own engine)")
        return evaluate(ray_jobs.PoolLabeller(engine, index, ray), test_set, limit=limit)
    return evaluate(get_engine(engine), test_set, limit=limit)


def classify_file(config: PipelineConfig, source: str, out: Path, *, text_field: str | None = None,
                  shard_size: int = 256, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """Label every text of a JSONL/CSV/Parquet file into `out`, resumably, in one process or on a
    Ray actor pool of engines (shards.py); returns a summary (the labels are in `out`)."""
    return shards.classify_file(config, source, out, text_field=text_field, shard_size=shard_size, ray=ray)


def generate_file(config: PipelineConfig, source: str, out: Path, *, text_field: str | None = None,
                  shard_size: int = 256, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """An output (and its demonstration ids) for every input of a JSONL/CSV/Parquet file, into
    `out`, resumably, in one process or on the Ray engine pool (shards.py); returns a summary."""
    return shards.generate_file(config, source, out, text_field=text_field, shard_size=shard_size, ray=ray)


def run_demo(*, n: int = 200, k: int = 8, lm: str = DEFAULT_LM, indexes_dir: Path | None = None) -> dict:
    """Build (once) the built-in Rotten Tomatoes index, then compare zero-shot, random-k and kNN-k
    on `n` held-out reviews with the packaged LM -> {index, rows (one per method), example}."""
    name = "rotten_tomatoes"
    folder = index_path(name, indexes_dir)
    try:
        index = ExampleIndex.load(folder)
        built = False
    except (ValueError, FileNotFoundError):
        build_index("rotten_tomatoes:train", name, indexes_dir=indexes_dir)
        index, built = ExampleIndex.load(folder), True
    engine = Engine.load(PipelineConfig(index=name, indexes_dir=str(indexes_dir) if indexes_dir else None, lm=lm),
                         index=index)
    test = load_dataset("rotten_tomatoes:test")
    rows = [evaluate(engine, test, method=m, k=0 if m == "zero" else k, limit=n) for m in ("zero", "random", "knn")]
    [example] = engine.classify([test[0].input])
    return {"index": {"path": str(folder), "count": index.manifest["count"], "built": built}, "rows": rows,
            "example": {"input": test[0].input, "gold": test[0].output, "prediction": asdict(example)}}


# ----------------------------------------------------------------------------- soft prompts, reference, report


def _training_parts(name: str, indexes_dir, lm_name: str, template: Path | None):
    folder = index_path(name, indexes_dir)
    index = ExampleIndex.load(folder)
    lm = load_lm(lm_name)
    tpl = resolve_template(index.kind, given=Template.from_json(template) if template else None,
                           stored=index.template, dataset=index.manifest.get("dataset"))
    return index, lm, PromptBuilder(tpl, lm.tokenizer, index.labels)


def build_anchors(name: str, *, out: Path, per_label: int = 1, support: int = 1024, seed: int = 0,
                  batch_size: int = 16, force: bool = False, readout: str = "knn", lm: str = DEFAULT_LM,
                  template: Path | None = None, indexes_dir: Path | None = None) -> dict:
    """kNN prompting's anchors for an index: the LM's next-token distribution for every record
    after a fixed context (knn_prompt.py), saved to `out` with the index version, LM and
    template they belong to; with readout "linear" also a linear readout fitted over them
    (readout.py). An existing anchors folder is replaced only with `force`."""
    readout = AnchorReadout(readout)
    check_out_dir(out)
    if Path(out).is_dir() and any(Path(out).iterdir()) and not (force and (Path(out) / "manifest.json").is_file()):
        raise ValueError(f"{out} is not empty: anchors go to a new or empty folder"
                         + ("" if not (Path(out) / "manifest.json").is_file() else " (or pass --force to replace them)"))
    index, model, builder = _training_parts(name, indexes_dir, lm, template)
    config = AnchorConfig(per_label=per_label, support=support, seed=seed, batch_size=batch_size)
    with Progress(len(index), "anchors", unit="records") as bar:
        anchors = make_anchors(model, builder, index, config, index_version=index_version(index_path(name, indexes_dir)),
                               progress=lambda done, _: bar.update(done - bar.done))
    anchors.save(out, replace=force)
    info = {"out": str(out), **{k: v for k, v in anchors.manifest.items() if k not in ("template", "ids")}}
    if readout is AnchorReadout.LINEAR:
        fitted = fit_readout(anchors)
        fitted.save(out)
        info["readout"] = {k: v for k, v in fitted.info.items() if k != "anchors_key"}
    return info


def tune(name: str, *, out: Path, method: str, n_virtual: int = 20, k: int | None = None, steps: int | None = None,
         epochs: int = 3, lr: float | None = None, batch_size: int = 8, seed: int = 0, init: str | None = None,
         init_text: str | None = None, train_pool: int | None = None, distill_from: Path | None = None,
         alpha: float = 1.0, resume: bool = False, force: bool = False, lm: str = DEFAULT_LM,
         template: Path | None = None, indexes_dir: Path | None = None) -> dict:
    """Train a soft prompt (prompt tuning, prefix tuning or IPT) on an index's records, LM frozen;
    with `distill_from` (a fine-tuned reference) toward the reference's label distribution."""
    check_out_dir(out)
    check_train_out(Path(out), SOFT_META_FILE, force=force, resume=resume)
    index, model, builder = _training_parts(name, indexes_dir, lm, template)
    cfg = SoftPromptConfig(method=method, n_virtual=n_virtual, k=k, init=init, init_text=init_text,
                           train=TrainSettings(epochs=epochs, max_steps=steps, lr=lr, batch_size=batch_size, seed=seed))
    teacher = load_teacher(distill_from, lm=model, builder=builder, labels=index.labels) if distill_from else None
    pool = index.dataset.subsample(train_pool, seed) if train_pool else index.dataset
    result = train_soft_prompt(model, pool, cfg, builder=builder, index=index, out=Path(out), teacher=teacher,
                               alpha=alpha, resume=resume, force=force)
    return {"out": str(result.out), **result.metrics}


def finetune_reference(name: str, *, out: Path, lora: bool = False, epochs: int = 1, steps: int | None = None,
                       lr: float | None = None, batch_size: int = 8, seed: int = 0, train_pool: int | None = None,
                       eval_every: int | None = None, patience: int | None = 3, min_epochs: float = 0.0,
                       resume: bool = False, force: bool = False, lm: str = DEFAULT_LM,
                       template: Path | None = None, indexes_dir: Path | None = None) -> dict:
    """Fine-tune the base LM on an index's records (full, or LoRA): the reference ICL approximates.
    Early stopping on a held-out split (10 %, at most 256 records) every `eval_every` steps, not
    before `min_epochs`; `resume` continues an interrupted run; `force` replaces a finished one."""
    check_out_dir(out)
    check_train_out(Path(out), FINETUNE_META_FILE, force=force, resume=resume)
    index, model, builder = _training_parts(name, indexes_dir, lm, template)
    cfg = FinetuneConfig(method="lora" if lora else "full", train=TrainSettings(
        epochs=epochs, max_steps=steps, lr=lr, batch_size=batch_size, seed=seed, eval_every=eval_every,
        patience=patience, min_epochs=min_epochs))
    pool = index.dataset.subsample(train_pool, seed) if train_pool else index.dataset
    result = finetune(model, pool, cfg, builder=builder, out=Path(out), resume=resume, force=force)
    return {"out": str(result.out), **result.metrics}


def compare(name: str, test: str, *, out: Path, reference: Path | None = None, methods=None, seeds: int = 3,
            k: int = 4, train_pool: int | None = None, test_limit: int | None = None, steps: int | None = None,
            eval_every: int | None = None, anchor_k: int = 8, threads: int | None = None, lm: str = DEFAULT_LM,
            template: Path | None = None, indexes_dir: Path | None = None) -> dict:
    """The approximation report: every method against the fine-tuned reference on one test set.
    `eval_every`: soft prompts keep 10 % of the pool (at most 64 records) apart and stop early
    when its loss has not improved for 3 evaluations (up to `steps`, default 400), instead of a
    fixed step count. Returns the report dict with its markdown under "markdown"."""
    soft = cmp.default_soft_train()
    if eval_every:
        soft = dataclasses.replace(soft, max_steps=steps or 400, eval_fraction=0.1, max_eval=64, eval_every=eval_every,
                                   patience=3)
    elif steps:
        soft = dataclasses.replace(soft, max_steps=steps)
    report = cmp.run_compare(
        index_path(name, indexes_dir), test, out=Path(out), reference=reference, methods=methods, seeds=seeds,
        k=k, lm=lm, train_pool=train_pool or cmp.DEFAULT_TRAIN_POOL, test_limit=test_limit or cmp.DEFAULT_TEST_LIMIT,
        template=Template.from_json(template) if template else None, threads=threads, soft_train=soft,
        anchor_k=anchor_k)
    return {**report, "markdown": cmp.format_report(report)}


def bounds_theory(*, eps: float, delta: float, V: int, m: int, l: int, d: int, c: float = 1.0) -> list[dict]:
    return theory_table(eps, delta, V=V, m=m, l=l, d=d, c=c)


def bounds_run(experiment: str, *, out: Path, quick: bool = False, seed: int = 0, lm: str = DEFAULT_LM,
               k: int = 4, reference: Path | None = None, template: Path | None = None,
               settings: dict | None = None) -> dict:
    """One bound-validation experiment -> its results, with the report's markdown under "report".
    `retrieval` uses the engine (kNN-k over an index of each pool, default embedder and LM)
    against a reference: a fine-tuned LM folder when given, else a bag-of-words
    logistic-regression probe trained on each pool (labelled as such in the report).
    `settings` override fields of the experiment's preset (e.g. {"draws": 2})."""
    settings = dict(settings or {})
    try:  # checked before the LM loads
        experiment = experiments.Experiment(experiment)
    except ValueError:
        raise experiments.ExperimentError(f"unknown experiment {experiment!r} "
                                          f"(choose from {', '.join(e.value for e in experiments.Experiment)})") from None
    model = load_lm(lm)
    if experiment is not experiments.Experiment.RETRIEVAL:
        return experiments.run(experiment, quick=quick, out=Path(out), lm=model, seed=seed, **settings)
    tpl = Template.from_json(template) if template else None
    predict = engine_predictor(model, k=k, template=tpl)
    if reference:
        ref = engine_predictor(load_finetuned(reference), k=0, template=tpl)
        ref.fixed = True  # trained once: the report says the reference does not move with N
    else:
        ref = experiments.bow_logreg()
    return experiments.run(experiment, quick=quick, out=Path(out), lm=model, seed=seed, predict=predict,
                           reference=ref, k=k, **settings)
