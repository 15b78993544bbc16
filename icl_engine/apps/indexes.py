"""Index management behind the front ends: build, update, inspect, search and delete example
indexes. One function per command, each returning a JSON-ready dict; nothing here parses flags or
prints. No model library is imported unless a function needs an LM (--auto-template), so the
index commands start in a fraction of a second."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from ..core.choices import DEFAULT_EMBEDDER, DEFAULT_LM, IndexType, KVDType, SelectionMethod
from ..core.data import TaskKind, is_blank, load_dataset
from ..core.embed import canonical_name, get_embedder
from ..core.index import (
    ExampleIndex,
    IndexConfig,
    check_writable,
    delete_index,
    index_path,
    list_indexes,
    store,
    update_index,
)
from ..core.progress import Progress
from ..core.prompt import Template
from ..core.registry import builtin_template
from ..core.results import Demo, GenerationDemo
from ..core.select import select_demonstrations
from ..core.templates import data_template, resolve_template, template_candidates
from . import ray_jobs

__all__ = ["build_index", "index_config", "ray_options", "UpdateError", "add_to_index", "remove_from_index", "search_index_template", "index_info", "delete_index_folder", "list_index_infos", "search", "search_loaded", "cache_index"]

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
        model = None
        if auto_template and given is None:  # a bad --lm fails before embedding
            from ..core.lm import load_lm

            model = load_lm(lm)
        if ray is not None:
            emb = get_embedder(embedder) if auto_template else None  # the search embeds its queries here
            index = ExampleIndex.from_vector_file(dataset, vectors, canonical_name(embedder), config,
                                                  scratch / "lists.ivfdata", move=True) if streamed \
                else ExampleIndex.from_vectors(dataset, vectors, canonical_name(embedder), config)
        else:
            with Progress(None, f"loading the embedder {embedder}"):
                emb = get_embedder(embedder)
            index = ExampleIndex.build(dataset, emb, config)
        if id_field:
            index.manifest["id_field"] = id_field
        extras, search = {}, None
        if given is not None:
            tpl, source = given, "given"
        elif auto_template:
            candidates = {**({"built-in": builtin} if builtin else {}), **template_candidates(dataset)}
            from ..core.template_search import search_templates

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
    if id_field is not None and id_field != m.get("id_field"):  # ids of two kinds never match: every row stored twice
        raise UpdateError(f"index {name!r} takes its ids from field {m['id_field']!r}, not {id_field!r}"
                          if m.get("id_field") else
                          f"index {name!r} has content-hash ids: rows with ids from {id_field!r} would never replace "
                          f"its records; add without --id-field, or rebuild with --force --id-field {id_field}")
    dataset = load_dataset(data, kind=index.kind, text_field=text_field, label_field=label_field,
                           labels=index.labels or None, id_field=id_field or m.get("id_field"))
    have, got = tuple(m.get("fields") or ()), tuple(dataset.fields)
    if have and got and have != got and text_field is None and label_field is None:  # named fields: the user's call
        raise UpdateError(f"{data}: fields {'/'.join(got)} are not index {name!r}'s {'/'.join(have)}, which its "
                          "template reads; rename them, or name them with --text-field/--label-field to add them anyway")
    result = update_index(folder, records=dataset.records, index=index,
                          embed=lambda texts: get_embedder(m["embedder"]).encode(texts))
    return {"name": name, "path": str(folder), **result, "ids": [r.id for r in dataset.records]}


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
    from ..core.lm import load_lm
    from ..core.template_search import search_templates

    search = search_templates(index, load_lm(lm), get_embedder(index.manifest["embedder"]), k=k,
                              n_validation=examples, candidates=candidates)
    index.manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    index.save(folder, replace=True, template=search.template.to_dict(), extras={**index.extras,
                                                                                  SEARCH_FILE: search.to_dict()})
    return {"name": name, "path": str(folder), **search.to_dict()}


def cache_index(name: str, *, lm: str = DEFAULT_LM, dtype: KVDType | str = KVDType.BFLOAT16,
                template: Path | None = None, batch_size: int = 16, indexes_dir: Path | None = None) -> dict:
    """Build index `name`'s demonstration KV cache (core/kvcache.py) for `lm` and the template its
    queries use (`template`, else the index's), for `--scoring cached`; it replaces the cache
    there was. Returns its size: bytes in all, per record and per token."""
    dtype = KVDType(dtype)
    folder = index_path(name, indexes_dir, for_write=True)
    index = ExampleIndex.load(folder)
    if index.version is None:  # a layout-1 folder: no versions for a cache to be tied to
        raise ValueError(f"index {name!r} has the old one-folder layout; rebuild it (icl index build --force) "
                         "before caching its demonstrations")
    if index.kind is not TaskKind.CLASSIFICATION:
        raise ValueError(f"index {name!r} holds {index.kind.value} data; cached scoring is for classification")
    given = Template.from_json(template) if template else None
    from ..core.adapters import load_model
    from ..core.kvcache import build_kv_cache, kv_folder
    from ..core.prompt import PromptBuilder

    with Progress(None, f"loading the LM {lm}"):
        model = load_model(lm)
    tpl = resolve_template(index.kind, given=given, stored=index.template, dataset=index.manifest.get("dataset"))
    builder = PromptBuilder(tpl, model.tokenizer, labels=index.labels)
    with Progress(len(index), f"caching the demonstrations of index {name}", unit="records") as bar:
        m = build_kv_cache(model, builder, index, kv_folder(folder), index_version=index.version, dtype=dtype,
                           batch_size=batch_size, progress=bar.update)
    return {"name": name, "path": m["path"], "version": index.version, "lm": m["lm"], "dtype": m["dtype"],
            "count": m["records"], "tokens": m["tokens"], "bytes": m["bytes"],
            "bytes_per_record": m["bytes_per_record"], "bytes_per_token": m["bytes_per_token"],
            "seconds": m["seconds"]}


def index_info(name: str, *, indexes_dir: Path | None = None) -> dict:
    """The index's manifest, with its current version (name and when it was made), the prompt
    template its queries use, and its lineage (the build, then every add/remove)."""
    folder = index_path(name, indexes_dir)
    index = ExampleIndex.load(folder)
    m = index.manifest
    template = resolve_template(index.kind, stored=index.template, dataset=m.get("dataset"))
    lineage = m.get("lineage") or [{"change": "build", "count": m["count"], "at": m["created"]}]
    return {"name": name, "path": str(folder), **m, "version": index.version,
            "version_created": m.get("updated", m["created"]), "template": template.to_dict(), "lineage": lineage}


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
                         "created": m["created"], "version_created": m.get("updated", m["created"])})
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
    if is_blank(query):
        raise ValueError("the query is empty")
    [qv] = embedder.encode([query])
    method = SelectionMethod.KNN if mmr_lambda is None else SelectionMethod.MMR
    sel = select_demonstrations(index, qv, method=method, k=k, query_text=query,
                                mmr_lambda=1.0 if mmr_lambda is None else mmr_lambda)
    # most similar first for display (prompt order puts it last); named as the demonstrations are
    kind = Demo if index.kind is TaskKind.CLASSIFICATION else GenerationDemo
    rows = [asdict(kind(index.records[i].id, float(s), index.records[i].input, index.records[i].output))
            for i, s in zip(sel.ids.tolist(), sel.scores.tolist())]
    return sorted(rows, key=lambda r: -r["score"])
