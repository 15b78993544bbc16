"""`icl`: a thin Typer CLI. Each command parses flags and calls one library function; user
mistakes (ValueError subclasses, missing files) become one line on stderr and exit code 1.
Set ICL_DEBUG=1 to see the traceback instead.

Only the commands that run a model import the model libraries (torch, transformers: seconds),
inside the command: `icl index info`, a usage error or a bad file answers in a fraction of a
second. The flags of an engine and its queries are declared once (PIPELINE_FLAGS) and added to
each query command by `pipeline_command`, which turns them into one PipelineConfig."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import click
import typer
from typer.core import TyperGroup

from ..core.choices import (
    DEFAULT_EMBEDDER,
    DEFAULT_LM,
    AnchorReadout,
    Calibration,
    DType,
    IndexType,
    KVDType,
    Scoring,
    SelectionMethod,
)
from ..core.config import PipelineConfig
from ..core.errors import one_line
from ..core.index import StaleWarning
from ..core.progress import set_log_file
from ..core.prompt import Template
from ..studies.bounds import format_theory_table, theory_table
from . import indexes
from .cli_format import (
    format_demo,
    format_eval,
    format_fit,
    format_generation,
    format_hits,
    format_info,
    format_prediction,
    format_template_search,
    format_update,
)

__all__ = ["app", "main"]



# What an interrupted command leaves behind, said in its one line.
_KEPT_ON_INTERRUPT = {
    "build": "the index was left as it was (a new one is published only when complete)",
    "delete": "the index is either still there or entirely gone",
    "add": "the index was left as it was (an update is published only when complete)",
    "remove": "the index was left as it was (an update is published only when complete)",
    "cache": "the KV cache was left as it was (a new one is published only when complete)",
    "tune": "no soft prompt was written (it is written only when training ends)",
    "finetune": "no model was written (it is written only when training ends)",
    "run": "finished points are kept under --out and reused when you run it again",
    "classify-file": "finished shards are kept in OUT.parts and reused when you run it again",
    "generate-file": "finished shards are kept in OUT.parts and reused when you run it again",
}


def _leaf_command(ctx: click.Context) -> str:
    """"build" for `icl index build ...`: the command that was running."""
    name, args = ctx.invoked_subcommand or "", sys.argv[1:]
    if name in ("index", "bounds") and name in args and args.index(name) + 1 < len(args):
        return args[args.index(name) + 1]
    return name


class _FriendlyGroup(TyperGroup):
    """Every failure of a command becomes `error: <one line>` on stderr and exit code 1: user
    mistakes raised by the library (ValueError subclasses), OS errors (permissions, a full disk, a
    file where a folder should be) and, as a last resort, anything else. ICL_DEBUG=1 shows the
    traceback instead. Usage errors (exit 2) are left to `main`."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            if os.environ.get("ICL_DEBUG"):
                raise
            kept = _KEPT_ON_INTERRUPT.get(_leaf_command(ctx), "nothing half-written was kept")
            typer.echo(f"interrupted: {kept}", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if os.environ.get("ICL_DEBUG"):
                raise
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(cls=_FriendlyGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Retrieval-augmented in-context learning with a frozen LM.")


@app.callback()
def _setup() -> None:
    # transformers' per-load "Loading weights" bar is noise on a one-second load and would put
    # extra lines before a one-line error on stderr; our own long work keeps its tqdm bars. Said
    # by environment, read when the libraries are first imported (by the commands that need them).
    quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if not os.environ.get("ICL_DEBUG"):  # library chatter would stand between the user and the one error line
        quiet["TRANSFORMERS_VERBOSITY"] = "error"
        logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    for key, value in quiet.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:  # already imported (the CLI run inside a Python process)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not os.environ.get("ICL_DEBUG"):
            hf_logging.set_verbosity_error()
    _one_line_stale_warnings()


def _one_line_stale_warnings() -> None:
    """A soft prompt trained on an earlier version of its index is used, with one line on stderr
    (not Python's two-line warning with a source line)."""
    shown = warnings.showwarning

    def show(message, category, *args, **kw):
        if issubclass(category, StaleWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, *args, **kw)

    warnings.showwarning = show


index_app = typer.Typer(no_args_is_help=True, help="Build and inspect example indexes.")
app.add_typer(index_app, name="index")

IndexesDir = typer.Option(None, "--indexes-dir", envvar="ICL_INDEXES", help="Where indexes live (default ./indexes).")
AsJson = typer.Option(False, "--json", help="Print one JSON object instead of a table.")
LogFile = typer.Option(None, "--log", envvar="ICL_LOG", help="Append progress lines (every ~10 s of long work) "
                       "to this file too.")


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


@index_app.command("build")
def index_build(
    data: str = typer.Argument(..., help="A JSONL/CSV file or a built-in name (rotten_tomatoes, rotten_tomatoes:train)."),
    name: str = typer.Option(..., "--name", help="Index name: one folder under the indexes dir (letters, digits, . _ -)."),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    label_field: Optional[str] = typer.Option(None, "--label-field"),
    embedder: str = typer.Option(DEFAULT_EMBEDDER, "--embedder", help="Embedder name/path, or hashing:DIM."),
    index_type: IndexType = typer.Option(IndexType.FLAT, "--index-type"),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="ivf, ivfpq_disk: k-means cells (default ~4*sqrt(n))."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="ivf, ivfpq_disk: cells searched per query (default "
                                         "16)."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="ivfpq_disk: PQ bytes per vector, divides the dimension "
                                       "(default: the largest divisor <= dim/8)."),
    pq_nbits: Optional[int] = typer.Option(None, "--pq-nbits", help="ivfpq_disk: bits per PQ code (default 8)."),
    rerank: Optional[int] = typer.Option(None, "--rerank", help="ivfpq_disk: the PQ proposes k*RERANK candidates, "
                                         "re-scored exactly (default 8)."),
    train_size: Optional[int] = typer.Option(None, "--train-size", help="ivfpq_disk: rows the IVF-PQ is trained on, "
                                             "a seeded sample (default nlist*256)."),
    hnsw_m: Optional[int] = typer.Option(None, "--hnsw-m", help="hnsw: links per node (default 32)."),
    ef_construction: Optional[int] = typer.Option(None, "--ef-construction", help="hnsw: build beam (default 80)."),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", help="hnsw: search beam (default 64)."),
    template: Optional[Path] = typer.Option(None, "--template", help="Default prompt template (JSON) stored with the index."),
    indexes_dir: Optional[Path] = IndexesDir,
    force: bool = typer.Option(False, "--force", help="Replace an existing index of this name."),
    auto_template: bool = typer.Option(False, "--auto-template", help="Choose the stored template by accuracy "
                                       "(ROUGE-L) on a held-out slice of the data; costs candidates x examples queries."),
    search_examples: int = typer.Option(150, "--search-examples", min=1, help="--auto-template: held-out examples "
                                        "per candidate (bounds the cost)."),
    search_k: int = typer.Option(8, "--search-k", min=1, help="--auto-template: demonstrations per query."),
    lm: str = typer.Option(DEFAULT_LM, "--lm", help="--auto-template: the LM that scores the candidates."),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="Record ids from this field (default: content "
                                           "hashes); `icl index add` then replaces a row by its id."),
    ray: bool = typer.Option(False, "--ray", help="Read with Ray Data and embed with a pool of Ray actors "
                             "(needs icl-engine[ray]); DATA may then be .parquet or a URL."),
    address: Optional[str] = typer.Option(None, "--address", help="--ray: a running Ray cluster (default: start "
                                          "one here)."),
    workers: int = typer.Option(2, "--workers", min=1, help="--ray: embedding actors (each loads the model once)."),
    log: Optional[Path] = LogFile,
    as_json: bool = AsJson,
):
    """Embed a labelled dataset and save a persistent index (with a prompt template made from the
    data unless --template or --auto-template says otherwise). A generation file (fields input,
    output) may hold a list of references per input: one demonstration per reference."""
    set_log_file(log)
    info = indexes.build_index(data, name, text_field=text_field, label_field=label_field, embedder=embedder,
                           index_type=index_type, template=template, indexes_dir=indexes_dir, force=force,
                           auto_template=auto_template, lm=lm, search_k=search_k, search_examples=search_examples,
                           id_field=id_field, ray=indexes.ray_options(ray, address=address, workers=workers),
                           index_settings=dict(nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_nbits=pq_nbits, rerank=rerank,
                                               train_size=train_size, hnsw_m=hnsw_m, ef_construction=ef_construction,
                                               ef_search=ef_search))
    if as_json:
        _print_json(info)
        return
    typer.echo(format_info(info))
    if "template_search" in info:
        typer.echo(format_template_search(info["template_search"]))


@index_app.command("add")
def index_add(
    name: str,
    data: str = typer.Argument(..., help="A JSONL/CSV file (or built-in name) with records for the index."),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    label_field: Optional[str] = typer.Option(None, "--label-field"),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="Record ids from this field (default: the "
                                           "index's, else content hashes)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="Must be the index's embedder (checked)."),
    template: Optional[Path] = typer.Option(None, "--template", help="Must be the index's template (checked)."),
    indexes_dir: Optional[Path] = IndexesDir,
    log: Optional[Path] = LogFile,
    as_json: bool = AsJson,
):
    """Add records to an index, replacing those with the same id (upsert), as a new version:
    only new texts are embedded; readers see the old or the new version."""
    set_log_file(log)
    info = indexes.add_to_index(name, data, text_field=text_field, label_field=label_field, id_field=id_field,
                            embedder=embedder, template=template, indexes_dir=indexes_dir)
    _print_json(info) if as_json else typer.echo(format_update(info))


@index_app.command("remove")
def index_remove(
    name: str,
    ids: List[str] = typer.Option(..., "--ids", help="Record ids to remove (repeat, or comma-separated)."),
    indexes_dir: Optional[Path] = IndexesDir,
    as_json: bool = AsJson,
):
    """Remove records from an index by id, as a new version (an unknown id changes nothing: error)."""
    info = indexes.remove_from_index(name, [i.strip() for group in ids for i in group.split(",")], indexes_dir=indexes_dir)
    _print_json(info) if as_json else typer.echo(format_update(info))


@index_app.command("fit")
def index_fit(
    name: str,
    candidates: Optional[List[str]] = typer.Option(None, "--candidate", help="Only these candidates (repeat): icl, "
                                                   "knn_prompting, readout, readout_ref, icl+readout, ipt (default: "
                                                   "all that apply)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="A fine-tuned reference (icl finetune): "
                                             "readout_ref learns its labels."),
    validation: Optional[int] = typer.Option(None, "--validation", min=2, help="Records held out to choose on "
                                             "(generation: inputs; default a fifth of the index, at most 500)."),
    seed: int = typer.Option(0, "--seed", help="The validation split, the anchors' context, the soft prompt's run."),
    ipt_steps: int = typer.Option(200, "--ipt-steps", min=1, help="Training steps of the IPT candidate."),
    refit: bool = typer.Option(False, "--refit", help="Choose nothing: fit the setting already attached again "
                               "with --seed (its validation split kept), to see the seed variance of one choice."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lm: str = typer.Option(DEFAULT_LM, "--lm", help="The LM the fit is for."),
    indexes_dir: Optional[Path] = IndexesDir,
    log: Optional[Path] = LogFile,
    as_json: bool = AsJson,
):
    """Choose, on a validation split of the index's own data, how its queries are answered
    (ICL, kNN prompting, a readout, IPT...; docs/approximation.md), fit the winner on every
    record and attach it: `--method auto` (the default) answers with it."""
    from . import training

    if refit and (candidates or validation is not None):
        raise typer.BadParameter("--refit keeps the attached choice and its validation split: drop --candidate "
                                 "and --validation")
    set_log_file(log)
    fit = training.fit_index(name, candidates=candidates, reference=reference, validation=validation, seed=seed,
                             ipt_steps=ipt_steps, batch_size=batch_size, lm=lm, indexes_dir=indexes_dir,
                             refit_only=refit)
    _print_json(fit) if as_json else typer.echo(format_fit(fit))


@index_app.command("cache")
def index_cache(
    name: str,
    lm: str = typer.Option(DEFAULT_LM, "--lm", help="The LM the cache is for (default: the packaged SmolLM2-135M-Instruct)."),
    dtype: KVDType = typer.Option(KVDType.BFLOAT16, "--dtype", help="How keys and values are stored: bfloat16 "
                                  "(default), int8 (half the size: one scale per token and head) or float32 (exact)."),
    template: Optional[Path] = typer.Option(None, "--template", help="The template the queries will use (default: "
                                            "the index's)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Demonstrations per LM forward."),
    indexes_dir: Optional[Path] = IndexesDir,
    log: Optional[Path] = LogFile,
    as_json: bool = AsJson,
):
    """Run every record's demonstration through the LM once and store its keys and values with
    the index, for `--scoring cached` (only the query is run then). Replaces the cache there was;
    a new index version, LM or template needs a new cache."""
    set_log_file(log)
    info = indexes.cache_index(name, lm=lm, dtype=dtype, template=template, batch_size=batch_size,
                               indexes_dir=indexes_dir)
    if as_json:
        _print_json(info)
        return
    typer.echo(f"cached the demonstrations of {info['count']} records of index {name} ({info['tokens']} tokens, "
               f"{info['dtype']}): {_size(info['bytes'])}, {_size(info['bytes_per_record'])} a record, "
               f"{info['bytes_per_token']:,} bytes a token, in {info['path']} ({info['seconds']:.0f} s)")


def _size(n: float) -> str:
    return next(f"{n / 10**e:.3g} {unit}" for e, unit in ((9, "GB"), (6, "MB"), (3, "KB"), (0, "bytes")) if n >= 10**e or not e)


anchors_app = typer.Typer(no_args_is_help=True, help="kNN prompting's anchors (Xu et al. 2023).")
app.add_typer(anchors_app, name="anchors")
template_app = typer.Typer(no_args_is_help=True, help="Prompt templates of an index.")
app.add_typer(template_app, name="template")


@template_app.command("search")
def template_search(
    name: str,
    k: int = typer.Option(8, "--k", min=1, help="Demonstrations per query."),
    examples: int = typer.Option(150, "--examples", min=1, help="Held-out examples per candidate (bounds the cost)."),
    lm: str = typer.Option(DEFAULT_LM, "--lm", help="The LM that scores the candidates."),
    indexes_dir: Optional[Path] = IndexesDir,
    as_json: bool = AsJson,
):
    """Score candidate templates on a held-out slice of an index's data and store the best with it."""
    result = indexes.search_index_template(name, lm=lm, k=k, examples=examples, indexes_dir=indexes_dir)
    _print_json(result) if as_json else typer.echo(format_template_search(result))


@index_app.command("delete")
def index_delete(name: str, indexes_dir: Optional[Path] = IndexesDir, as_json: bool = AsJson):
    """Delete an index (only a folder icl_engine made)."""
    info = indexes.delete_index_folder(name, indexes_dir=indexes_dir)
    _print_json(info) if as_json else typer.echo(f"deleted {info['path']}" + (f" ({info['count']} records)" if info["count"] is not None else ""))


@index_app.command("list")
def index_list(indexes_dir: Optional[Path] = IndexesDir, as_json: bool = AsJson):
    """List the indexes under the indexes dir."""
    rows = indexes.list_index_infos(indexes_dir=indexes_dir)
    if as_json:
        _print_json(rows)
    else:
        typer.echo("\n".join(f"{r['name']}  error: {r['error']}" if "error" in r else
                              f"{r['name']}  {r['count']} records  {r['kind']}  {r['embedder']}  {r['version_created']}"
                              for r in rows) or "no indexes")


@index_app.command("info")
def index_info(name: str, indexes_dir: Optional[Path] = IndexesDir, as_json: bool = AsJson):
    """Show an index's manifest."""
    info = indexes.index_info(name, indexes_dir=indexes_dir)
    _print_json(info) if as_json else typer.echo(format_info(info))


@index_app.command("search")
def index_search(
    name: str,
    query: str,
    k: int = typer.Option(8, "-k", "--k", min=1),
    mmr: Optional[float] = typer.Option(None, "--mmr", min=0.0, max=1.0, help="MMR lambda (1 = pure similarity)."),
    indexes_dir: Optional[Path] = IndexesDir,
    as_json: bool = AsJson,
):
    """Show the demonstrations chosen for a query."""
    hits = indexes.search(name, query, k=k, mmr_lambda=mmr, indexes_dir=indexes_dir)
    _print_json(hits) if as_json else typer.echo(format_hits(hits))


# ----------------------------------------------------------------------------- engine and query flags

_FileArg = Optional[Path]
# PipelineConfig field -> (type, flag): declared once, added to each query command that takes it.
PIPELINE_FLAGS: dict[str, tuple[object, typer.models.OptionInfo]] = {
    "indexes_dir": (Optional[Path], IndexesDir),
    "lm": (str, typer.Option(DEFAULT_LM, "--lm", help="LM name or folder (default: the packaged SmolLM2-135M-Instruct).")),
    "dtype": (Optional[DType], typer.Option(None, "--dtype", help="LM weights' dtype (default: exact float32 on CPU). "
                                            "bfloat16 is faster on CPUs with AMX but changes the scores slightly.")),
    "compile": (bool, typer.Option(False, "--compile", help="torch.compile the LM's forward: about twice the scoring "
                                   "speed on a GPU after a compile of one to a few minutes at start.")),
    "trust_remote_code": (bool, typer.Option(False, "--trust-remote-code", help="Allow the LM's own code from its "
                                             "folder/hub (off by default).")),
    "template": (_FileArg, typer.Option(None, "--template", help="Prompt template JSON file.")),
    "soft_prompt": (_FileArg, typer.Option(None, "--soft-prompt", help="A trained soft prompt folder (icl tune).")),
    "anchors": (_FileArg, typer.Option(None, "--anchors", help="kNN prompting: an anchors folder (icl anchors build).")),
    "method": (SelectionMethod, typer.Option(SelectionMethod.AUTO, "--method", help="auto: what the index's fit "
                                             "chose (icl index fit), else knn.")),
    "k": (int, typer.Option(8, "--k", min=0, help="Number of demonstrations.")),
    "budget": (Optional[int], typer.Option(None, "--budget", min=1, help="Total prompt token budget (default: the "
                                           "LM's context).")),
    "calibration": (Calibration, typer.Option(Calibration.NONE, "--calibration", help="none|contextual|pmi")),
    "seed": (int, typer.Option(0, "--seed")),
    "batch_size": (int, typer.Option(8, "--batch-size", min=1)),
    "max_new_tokens": (int, typer.Option(64, "--max-new-tokens", min=1, help="Generation: most tokens per output.")),
    "anchor_k": (int, typer.Option(8, "--anchor-k", min=1, help="kNN prompting: anchors that vote.")),
    "anchor_weight": (Optional[float], typer.Option(None, "--anchor-weight", min=0.0, max=1.0, help="kNN "
                                                    "prompting's share of the label probabilities (default 1 with "
                                                    "--anchors: anchors alone; below 1: mixed with the "
                                                    "demonstrations' scores).")),
    "anchor_readout": (AnchorReadout, typer.Option(AnchorReadout.KNN, "--anchor-readout", help="kNN prompting: knn "
                                                   "(the nearest anchors vote) | linear (the readout fitted with "
                                                   "`icl anchors build --readout linear`).")),
    "scoring": (Scoring, typer.Option(Scoring.EXACT, "--scoring", help="exact: the whole prompt through the LM; "
                                      "cached: the demonstrations' keys/values from the index's KV cache (icl index "
                                      "cache), only the query is run, and k is not bounded by the context.")),
}
_LM, _SEED, _BATCH, _TEMPLATE, _DTYPE, _COMPILE = (PIPELINE_FLAGS[f][1] for f in
                                                   ("lm", "seed", "batch_size", "template", "dtype", "compile"))
SPEC = ("indexes_dir", "lm", "dtype", "trust_remote_code", "template", "soft_prompt")
SELECT = ("method", "k", "budget", "seed")
KNN_PROMPTING = ("anchors", "anchor_k", "anchor_weight", "anchor_readout")
_CONFIG = typer.Option(None, "--config", help="A pipeline config JSON (PipelineConfig.save); NAME and the "
                       "options given here override its fields.")
_CALIBRATE = typer.Option(False, "--calibrate", help="Contextual calibration (Zhao et al. 2021): --calibration "
                          "contextual.")


def _given(ctx: click.Context, param: str) -> bool:
    """Set on the command line or by its environment variable (not left at its default)."""
    # by name: typer runs on its own copy of click, whose ParameterSource is another enum class
    source = ctx.get_parameter_source(param) if param in ctx.params else None
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _flag_value(field: str, value):
    """A flag's value as the PipelineConfig field holds it."""
    if value is None:
        return None
    if field == "template":
        return Template.from_json(value)
    if field in ("indexes_dir", "soft_prompt", "anchors"):
        return str(value)
    return value.value if field == "dtype" else value


def pipeline_config(ctx: click.Context, name: str, flags: dict, config_file: Path | None,
                    fixed: dict | None = None) -> PipelineConfig:
    """The PipelineConfig of a query command. Precedence: NAME and the options given on the
    command line (or by their environment variable) > the --config file > the options'
    defaults; `fixed` (what the command itself decides, e.g. batch size 1 for one text) last."""
    values = {f: _flag_value(f, v) for f, v in flags.items()}
    if config_file is None:
        return PipelineConfig(index=name, **values, **(fixed or {}))
    merged = PipelineConfig.load(config_file).to_dict()
    merged.update({f: v for f, v in values.items() if _given(ctx, f)}, index=name, **(fixed or {}))
    return PipelineConfig.from_dict(merged, where=str(config_file))


def pipeline_command(*names: str, **fixed):
    """Add the PIPELINE_FLAGS `names` and --config to a command whose function takes `name`
    (the index) and `config`: the decorated function receives the PipelineConfig they make."""
    def decorate(fn):
        sig = inspect.signature(fn)
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=PIPELINE_FLAGS[n][1],
                                   annotation=PIPELINE_FLAGS[n][0]) for n in names]
        added.append(inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=_CONFIG,
                                       annotation=Optional[Path]))
        ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        own = [p for p in sig.parameters.values() if p.name != "config"]

        @functools.wraps(fn)
        def command(ctx: typer.Context, **kw):
            flags = {n: kw.pop(n) for n in names}
            if kw.pop("calibrate", False) and flags.get("calibration") is Calibration.NONE:
                flags["calibration"] = Calibration.CONTEXTUAL
                ctx.params["calibration"] = flags["calibration"]
            config = pipeline_config(ctx, kw["name"], flags, kw.pop("config_file"), fixed)
            return fn(config=config, **kw)

        command.__signature__ = sig.replace(parameters=[ctx_param, *own, *added])
        return command
    return decorate


def _queries():
    """The query functions (they import the model libraries)."""
    from . import queries

    return queries


@app.command()
@pipeline_command(*SPEC, *SELECT, "calibration", "scoring", *KNN_PROMPTING, batch_size=1)
def classify(name: str, text: str, config: PipelineConfig, calibrate: bool = _CALIBRATE, as_json: bool = AsJson):
    """Classify one text with retrieved demonstrations (label log-likelihood), or by kNN prompting."""
    result = _queries().classify(config, text)
    _print_json(result) if as_json else typer.echo(format_prediction(result))


@app.command("generate")
@pipeline_command(*SPEC, *SELECT, "max_new_tokens", batch_size=1)
def generate_cmd(name: str, input: str, config: PipelineConfig, as_json: bool = AsJson):
    """Generate an output for one input with retrieved demonstrations."""
    result = _queries().generate(config, input)
    _print_json(result) if as_json else typer.echo(format_generation(result))


_RAY = typer.Option(False, "--ray", help="Answer with a pool of Ray actors, each holding one engine (needs the "
                    "ray extra: pip install 'icl-engine[ray]').")
_ADDRESS = typer.Option(None, "--address", help="--ray: a running Ray cluster (default: start one here).")
_WORKERS = typer.Option(2, "--workers", min=1, help="--ray: engine actors (each loads the LM once).")


@app.command("eval")
@pipeline_command(*SPEC, "compile", *SELECT, "calibration", "scoring", "batch_size", "max_new_tokens", *KNN_PROMPTING)
def eval_cmd(
    name: str,
    config: PipelineConfig,
    test: str = typer.Option(..., "--test", help="Test file (JSONL/CSV) or built-in name."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N rows of the test "
                                        "file (generation: the first N distinct inputs)."),
    calibrate: bool = _CALIBRATE,
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    label_field: Optional[str] = typer.Option(None, "--label-field"),
    as_json: bool = AsJson,
    predictions: bool = typer.Option(False, "--predictions", help="Include per-example predictions in --json."),
    ray: bool = _RAY,
    address: Optional[str] = _ADDRESS,
    workers: int = _WORKERS,
    log: Optional[Path] = LogFile,
):
    """Evaluate on a labelled test file: accuracy/macro-F1/confusion, or BLEU/ROUGE-L against all
    references of an input."""
    set_log_file(log)
    result = _queries().evaluate_file(config, test, limit=limit, text_field=text_field, label_field=label_field,
                                      ray=indexes.ray_options(ray, address=address, workers=workers))
    if not predictions:
        result.pop("predictions", None)
    _print_json(result) if as_json else typer.echo(format_eval(result))


_OUT = typer.Option(..., "--out", help="Output file: JSONL, or Parquet for a .parquet name. Finished shards are "
                    "kept in OUT.parts/ and reused by a re-run.")
_SHARD = typer.Option(None, "--shard-size", min=1, help="Texts per shard, the unit of resumption (default 256; "
                      "with --ray fewer, so that every actor gets a shard).")


@app.command("classify-file")
@pipeline_command(*SPEC, "compile", *SELECT, "calibration", "scoring", "batch_size", *KNN_PROMPTING)
def classify_file_cmd(
    config: PipelineConfig,
    source: str = typer.Argument(..., help="JSONL/CSV (or Parquet) file of texts to label."),
    out: Path = _OUT,
    name: str = typer.Option(..., "--index", help="The index to draw demonstrations from."),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    shard_size: Optional[int] = _SHARD,
    ray: bool = _RAY,
    address: Optional[str] = _ADDRESS,
    workers: int = _WORKERS,
    log: Optional[Path] = LogFile,
    as_json: bool = AsJson,
):
    """Label every text of a file (label, probabilities, demonstration ids per row), resumably;
    by kNN prompting too, as `icl classify` (--anchors, --anchor-k, --anchor-weight)."""
    set_log_file(log)
    result = _queries().classify_file(config, source, out, text_field=text_field, shard_size=shard_size,
                                      ray=indexes.ray_options(ray, address=address, workers=workers))
    _print_json(result) if as_json else typer.echo(
        f"labelled {result['texts']} texts into {result['out']} ({result['shards']} shards, "
        f"{result['resumed_shards']} reused from an earlier run; {result['seconds']:.1f} s)")


@app.command("generate-file")
@pipeline_command(*SPEC, *SELECT, "batch_size", "max_new_tokens")
def generate_file_cmd(
    config: PipelineConfig,
    source: str = typer.Argument(..., help="JSONL/CSV (or Parquet) file of inputs."),
    out: Path = _OUT,
    name: str = typer.Option(..., "--index", help="The generation index to draw demonstrations from."),
    text_field: Optional[str] = typer.Option(None, "--text-field"),
    shard_size: Optional[int] = _SHARD,
    ray: bool = _RAY,
    address: Optional[str] = _ADDRESS,
    workers: int = _WORKERS,
    log: Optional[Path] = LogFile,
    as_json: bool = AsJson,
):
    """Generate an output for every input of a file (output text, demonstration ids per row), resumably."""
    set_log_file(log)
    result = _queries().generate_file(config, source, out, text_field=text_field, shard_size=shard_size,
                                      ray=indexes.ray_options(ray, address=address, workers=workers))
    _print_json(result) if as_json else typer.echo(
        f"generated {result['texts']} outputs into {result['out']} ({result['shards']} shards, "
        f"{result['resumed_shards']} reused from an earlier run; {result['seconds']:.1f} s)")


@app.command()
def demo(
    n: int = typer.Option(100, "--n", min=1, help="Reviews of the test split to evaluate (the first N)."),
    k: int = typer.Option(8, "--k", min=1),
    pool: Optional[int] = typer.Option(None, "--pool", min=2, max=11752, help="Built-in training reviews in the "
                                       "demo's index (the first N of a seeded shuffle; default 1,000)."),
    lm: str = _LM,
    indexes_dir: Optional[Path] = IndexesDir,
):
    """The main job: an index over built-in Rotten Tomatoes reviews; zero-shot, kNN-k ICL, a
    readout over kNN prompting's anchors, and kNN-k mixed with the readout, on held-out reviews."""
    queries = _queries()
    typer.echo(format_demo(queries.run_demo(n=n, k=k, pool=pool or queries.DEMO_POOL, lm=lm, indexes_dir=indexes_dir)))


@app.command()
def serve(
    index: Optional[List[str]] = typer.Option(None, "--index", help="An index to load at start (repeat); "
                                              "others load when a request first names them."),
    indexes_dir: Optional[Path] = IndexesDir,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    max_batch_size: int = typer.Option(64, "--max-batch-size", min=1, help="Most texts merged into one engine "
                                       "call (and per request)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, help="How long a request waits for others "
                                      "to share its batch."),
    batch_size: int = _BATCH,
    timeout: float = typer.Option(60.0, "--timeout", min=0.001, help="A request's deadline in seconds: unanswered "
                                  "by then it gets a 504 and its work stops."),
    max_queue_s: float = typer.Option(10.0, "--max-queue-s", min=0.001, help="Most seconds of work (at the "
                                      "measured speed) that may wait for the model; beyond, 503 with Retry-After."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Most requests waiting for the model."),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, "--max-body-bytes", min=1, help="Larger request bodies "
                                       "are refused (413) unread."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ICL_API_KEY", help="Require "
                                          "'Authorization: Bearer KEY' on every endpoint but /healthz and /readyz."),
    adapters_dir: Optional[Path] = typer.Option(None, "--adapters-dir", envvar="ICL_ADAPTERS", help="Soft prompts "
                                                "a request may name (default ./adapters)."),
    lm: str = _LM,
    dtype: Optional[DType] = _DTYPE,
    compile_lm: bool = _COMPILE,
):
    """Serve the engine over HTTP (FastAPI): classify, generate, search, OpenAI-compatible
    completions, health, readiness and Prometheus metrics; docs at /docs."""
    from .service import ServeConfig
    from .service import serve as run_service

    run_service(ServeConfig(
        indexes=tuple(index or ()), indexes_dir=str(indexes_dir) if indexes_dir else None, host=host, port=port,
        max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, batch_size=batch_size, timeout_s=timeout,
        max_queue_s=max_queue_s, max_queue=max_queue, max_body_bytes=max_body_bytes,
        api_key=api_key, adapters_dir=str(adapters_dir) if adapters_dir else None, lm=lm,
        dtype=dtype.value if dtype else None, compile=compile_lm))


def main() -> None:
    """The `icl` console script: usage errors are one line too (exit 2); bare `icl` prints help."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `icl index` alone: its help, on stdout
            typer.echo(e.format_message())
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        msg = e.format_message().strip().splitlines()
        typer.echo(f"error: {msg[0] if msg else type(e).__name__}{hint}", err=True)
        sys.exit(getattr(e, "exit_code", 1))
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # outside a command (while parsing): nothing had started
        typer.echo("interrupted: nothing was started", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


@anchors_app.command("build")
def anchors_build(
    name: str,
    out: Path = typer.Option(..., "--out", help="A new or empty folder for the anchors."),
    per_label: int = typer.Option(1, "--per-label", min=0, help="Context demonstrations per label."),
    support: int = typer.Option(1024, "--support", min=1, help="Vocabulary tokens kept per distribution."),
    seed: int = _SEED,
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    force: bool = typer.Option(False, "--force", help="Replace anchors already in OUT."),
    readout: AnchorReadout = typer.Option(AnchorReadout.KNN, "--readout", help="linear: also fit a linear readout "
                                          "over the anchors (for --anchor-readout linear); knn: the vote only."),
    lm: str = _LM,
    template: Optional[Path] = _TEMPLATE,
    indexes_dir: Optional[Path] = IndexesDir,
):
    """kNN prompting: the LM's next-token distribution for every record of the index after a
    fixed short context, for `classify/eval --anchors OUT`."""
    from . import training

    _print_json(training.build_anchors(name, out=out, per_label=per_label, support=support, seed=seed,
                                  batch_size=batch_size, force=force, readout=readout, lm=lm, template=template,
                                  indexes_dir=indexes_dir))


@app.command()
def tune(
    name: str,
    out: Path = typer.Option(..., "--out", help="Folder for the soft prompt (PEFT adapter format)."),
    method: str = typer.Option("prompt", "--method", help="prompt | prefix | ipt"),
    virtual_tokens: int = typer.Option(20, "--virtual-tokens", min=1),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="IPT: demonstrations per training prompt (default 4)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps (overrides --epochs)."),
    epochs: int = typer.Option(3, "--epochs", min=1),
    lr: Optional[float] = typer.Option(None, "--lr"),
    batch_size: int = _BATCH,
    seed: int = _SEED,
    init: Optional[str] = typer.Option(None, "--init", help="text | vocab | random (| zero for prefix)"),
    init_text: Optional[str] = typer.Option(None, "--init-text"),
    train_pool: Optional[int] = typer.Option(None, "--train-pool", min=2, help="Subsample the index's records."),
    distill_from: Optional[Path] = typer.Option(None, "--distill-from", help="A fine-tuned reference (icl "
                                                "finetune): learn its label distribution on the training records."),
    alpha: float = typer.Option(1.0, "--alpha", min=0.0, max=1.0, help="With --distill-from: weight of the KL to "
                                "the reference (the rest on the gold labels)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT/checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace a trained soft prompt in OUT."),
    lm: str = _LM,
    template: Optional[Path] = _TEMPLATE,
    indexes_dir: Optional[Path] = IndexesDir,
):
    """Train a soft prompt with the LM frozen (prompt tuning, prefix tuning, instruction prompt tuning),
    optionally distilled from the fine-tuned reference."""
    methods = {"prompt": "prompt_tuning", "prefix": "prefix_tuning", "ipt": "ipt"}
    if method not in methods and method not in methods.values():
        raise typer.BadParameter(f"choose from {', '.join(methods)}", param_hint="--method")
    from . import training

    _print_json(training.tune(name, out=out, method=methods.get(method, method), n_virtual=virtual_tokens, k=k,
                         steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, init=init,
                         init_text=init_text, train_pool=train_pool, distill_from=distill_from, alpha=alpha,
                         resume=resume, force=force, lm=lm, template=template, indexes_dir=indexes_dir))


@app.command()
def finetune(
    name: str,
    out: Path = typer.Option(..., "--out"),
    lora: bool = typer.Option(False, "--lora", help="LoRA through PEFT instead of full fine-tuning."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="At most this many epochs (early stopping may end sooner)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1),
    lr: Optional[float] = typer.Option(None, "--lr"),
    batch_size: int = _BATCH,
    seed: int = _SEED,
    train_pool: Optional[int] = typer.Option(None, "--train-pool", min=2),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1,
                                             help="Steps between held-out evaluations (default: once per epoch)."),
    patience: int = typer.Option(3, "--patience", min=1, help="Stop after this many evaluations without a better "
                                 "held-out loss."),
    min_epochs: float = typer.Option(0.0, "--min-epochs", min=0.0, help="No early stop before this many epochs."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT/checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace a finished model in OUT."),
    lm: str = _LM,
    template: Optional[Path] = _TEMPLATE,
    indexes_dir: Optional[Path] = IndexesDir,
):
    """Fine-tune the base LM on the index's records: the reference that ICL approximates."""
    from . import training

    _print_json(training.finetune_reference(name, out=out, lora=lora, epochs=epochs, steps=steps, lr=lr,
                                       batch_size=batch_size, seed=seed, train_pool=train_pool,
                                       eval_every=eval_every, patience=patience, min_epochs=min_epochs,
                                       resume=resume, force=force, lm=lm, template=template,
                                       indexes_dir=indexes_dir))


bounds_app = typer.Typer(no_args_is_help=True, help="Sample-size bounds of ICL vs fine-tuning (Sharma 2025).")
app.add_typer(bounds_app, name="bounds")


@bounds_app.command("theory")
def bounds_theory(
    eps: float = typer.Option(0.1, "--eps", min=0.0),
    delta: float = typer.Option(0.05, "--delta", min=0.0, max=1.0),
    V: int = typer.Option(49152, "--V", min=2, help="Vocabulary size."),
    m: int = typer.Option(100, "--m", min=1, help="Number of contexts."),
    l: int = typer.Option(32, "--l", min=1, help="Output length."),
    d: int = typer.Option(8, "--d", min=1, help="Input dimension (linear classification)."),
    c: float = typer.Option(1.0, "--c", help="The hidden constant."),
    as_json: bool = AsJson,
):
    """Required dataset size N for each bound at (eps, delta)."""
    rows = theory_table(eps, delta, V=V, m=m, l=l, d=d, c=c)
    _print_json(rows) if as_json else typer.echo(format_theory_table(rows))


def _parse_setting(text: str) -> tuple[str, object]:
    """"draws=2" -> ("draws", 2); values are JSON ([2, 4] for tuples), else plain strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


@bounds_app.command("run")
def bounds_run(
    experiment: str = typer.Option(..., "--experiment", help="linear | generation | retrieval"),
    out: Path = typer.Option(Path("reports/bounds"), "--out"),
    quick: bool = typer.Option(False, "--quick", help="Minutes instead of up to ~90 minutes."),
    seed: int = _SEED,
    k: int = typer.Option(4, "--k", min=1, help="retrieval: demonstrations per query."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="retrieval: fine-tuned reference folder."),
    dataset: Optional[List[str]] = typer.Option(None, "--dataset", help="retrieval: rotten_tomatoes and/or "
                                                "snips_intents (repeat; default both)."),
    template: Optional[Path] = _TEMPLATE,
    cached: bool = typer.Option(False, "--cached", help="retrieval: also a cached many-shot row, k = min(N, "
                                "--cached-k-max) demonstrations read from a KV cache of each pool."),
    cached_k_max: Optional[int] = typer.Option(None, "--cached-k-max", min=1, help="retrieval: the many-shot "
                                               "row's largest k (default 64)."),
    cached_same_k: bool = typer.Option(False, "--cached-same-k", help="retrieval: also a cached row with --k "
                                       "demonstrations (like for like with the exact row)."),
    settings: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE overriding a field of the "
                                                 "experiment's preset, e.g. --set draws=2 (repeat)."),
    lm: str = _LM,
):
    """Run a bound-validation experiment: error against dataset size, fitted slopes and verdicts."""
    overrides = dict(_parse_setting(s) for s in settings or ())
    if dataset:
        overrides["datasets"] = tuple(dataset)
    flags = {"cached": cached or None, "cached_k_max": cached_k_max, "cached_same_k": cached_same_k or None}
    overrides.update({key: value for key, value in flags.items() if value is not None})  # the settings they name
    from . import reports

    result = reports.bounds_run(experiment, out=out / experiment, quick=quick, seed=seed, lm=lm, k=k, reference=reference,
                            template=template, settings=overrides)
    typer.echo(result["report"])
