"""Training behind the front ends, the LM always frozen but for the reference: kNN prompting's
anchors (and their readout), soft prompts (prompt/prefix tuning, IPT, distilled), and the
fine-tuned reference. The output folder is checked before the model libraries are imported."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..core.atomic import check_out_dir
from ..core.choices import DEFAULT_LM, AnchorReadout
from ..core.index import ExampleIndex, index_path, index_version
from ..core.progress import Progress
from ..core.prompt import PromptBuilder, Template
from ..core.templates import resolve_template

__all__ = ["build_anchors", "tune", "finetune_reference", "fit_index"]

def _training_parts(name: str, indexes_dir, lm_name: str, template: Path | None):
    from ..core.lm import load_lm

    folder = index_path(name, indexes_dir)
    index = ExampleIndex.load(folder)
    with Progress(None, f"loading the LM {lm_name}"):
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
    from ..core.knn_prompt import AnchorConfig
    from ..core.knn_prompt import build_anchors as make_anchors
    from ..core.readout import fit_readout

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
    from ..core.adapters import META_FILE as SOFT_META_FILE
    from ..train.distill import load_teacher
    from ..train.loop import TrainSettings, check_train_out
    from ..train.soft_prompt import SoftPromptConfig, train_soft_prompt

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
    from ..core.adapters import FINETUNE_META_FILE
    from ..train.finetune import FinetuneConfig, finetune
    from ..train.loop import TrainSettings, check_train_out

    check_train_out(Path(out), FINETUNE_META_FILE, force=force, resume=resume)
    index, model, builder = _training_parts(name, indexes_dir, lm, template)
    cfg = FinetuneConfig(method="lora" if lora else "full", train=TrainSettings(
        epochs=epochs, max_steps=steps, lr=lr, batch_size=batch_size, seed=seed, eval_every=eval_every,
        patience=patience, min_epochs=min_epochs))
    pool = index.dataset.subsample(train_pool, seed) if train_pool else index.dataset
    result = finetune(model, pool, cfg, builder=builder, out=Path(out), resume=resume, force=force)
    return {"out": str(result.out), **result.metrics}


def _attached_choice(folder: Path, index, lm: str, template, reference: Path | None):
    """(setting, P' rows, info) of the fit attached to the index's current version: what a refit
    with another seed keeps. ValueError when none is attached (or it belongs to another LM or
    template) or it learnt a reference's labels and no --reference is given."""
    from ..core.fits import read_fit
    from ..train.fit import Setting

    fit = read_fit(folder, index.version, lm=lm, template=template.to_dict())
    if fit is None:
        raise ValueError(f"--refit: no fit is attached to {index.version} of this index for {lm} and this "
                         "template (run `icl index fit` first)")
    info = {k: fit.info[k] for k in ("lm", "template", "index_version", "selected_on", "metric", "table",
                                     "validation", "reference")}
    if fit.info["reference_labels"] and reference is None:
        raise ValueError(f"--refit: the attached fit learnt the labels of the reference {info['reference']}; "
                         "give it with --reference")
    held = set(info["validation"]["ids"])
    pool_rows = [i for i, r in enumerate(index.records) if r.id not in held]
    # fit.json stores params with sorted keys; the setting's own order (its name) is kept
    order = [part.split("=", 1)[0] for part in fit.info["setting"].split()[1:]]
    params = sorted(fit.info["params"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    return Setting(fit.info["candidate"], tuple(params)), pool_rows, info


def fit_index(name: str, *, candidates: list[str] | None = None, reference: Path | None = None,
              validation: int | None = None, seed: int = 0, ipt_steps: int = 200, batch_size: int = 8,
              lm: str = DEFAULT_LM, indexes_dir: Path | None = None, refit_only: bool = False) -> dict:
    """Choose how the index's queries are answered (docs/approximation.md): every candidate
    fitted on the index less a seeded validation split and scored on that split; the winner
    fitted again on every record and attached to the index's current version, where method
    "auto" (the default) finds it. `reference`: a fine-tuned reference (icl finetune) whose
    labels a readout may learn (readout_ref). `refit_only`: choose nothing; fit the setting
    already attached again with `seed` (its validation split kept), to see a choice's seed
    variance. Returns the fit (fit.json)."""
    from ..core.fits import fit_folder
    from ..train.fit import CANDIDATES, FitSettings, reference_labeller, refit, select, split

    folder = index_path(name, indexes_dir, for_write=True)
    unknown = sorted(set(candidates or ()) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"unknown candidates {unknown} (choose from {', '.join(CANDIDATES)})")
    if reference is not None and not Path(reference).is_dir():
        raise ValueError(f"--reference {reference}: no such folder")
    index, model, builder = _training_parts(name, indexes_dir, lm, None)
    units = len({r.input for r in index.records}) if index.kind.value == "generation" else len(index)
    settings = FitSettings(validation=validation or min(500, max(2, units // 5)), seed=seed,
                           candidates=tuple(candidates) if candidates else None, batch_size=batch_size,
                           ipt={"k": 4, "n_virtual": 20, "steps": ipt_steps})
    from ..core.embed import get_embedder

    embedder, work = get_embedder(index.manifest["embedder"]), folder / "fits" / f".work-{index.version}"
    labels = None
    if reference is not None:
        from ..core.adapters import load_finetuned

        labels = reference_labeller(index, load_finetuned(reference), embedder, builder.template,
                                    work / "reference_labels.json", batch_size=batch_size)
    if refit_only:
        best, pool_rows, info = _attached_choice(folder, index, model.name, builder.template, reference)
    else:
        chosen = select(index, model, embedder, builder.template, settings, work=work, reference_labels=labels)
        pool_rows, _ = split(index, settings.validation, seed)
        best = chosen.best
        info = {"lm": model.name, "template": builder.template.to_dict(), "index_version": index.version,
                "selected_on": "validation", "metric": chosen.metric, "table": chosen.table,
                "validation": {"records": len(chosen.validation_ids), "seed": seed, "ids": chosen.validation_ids},
                "reference": str(reference) if reference else None}
    fit = refit(index, model, embedder, builder.template, best, seed=seed, out=fit_folder(folder, index.version),
                work=work, info=info, reference_labels=labels, context_pool=[index.records[i] for i in pool_rows])
    for old in (folder / "fits").iterdir():  # fits of versions replaced since are never read again
        if old.name not in (index.version, work.name) and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return {"name": name, "path": str(fit_folder(folder, index.version)), **fit}
