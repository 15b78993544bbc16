"""kNN prompting (Xu et al. 2023, "kNN Prompting: Beyond-Context Learning with Calibration-Free
Nearest Neighbor Inference"): label a query by the pool records whose LM next-token
distributions are nearest to its own, so the whole pool is used, not only what fits in a prompt.

    anchors = build_anchors(lm, builder, index, AnchorConfig())    # one LM pass per pool record
    anchors.save("anchors/rt")                                     # safetensors + manifest.json
    knn = KnnPrompter(lm, builder, Anchors.load("anchors/rt", lm=lm, builder=builder, index=index), index)
    probs, nearest = knn.predict(["a tender, funny film"], k=8)    # [q, L] label shares, [q, k] rows

Every record (an "anchor") is put after the same short context: the template's instruction and
`per_label` demonstrations of each label, drawn once by seed. The LM's distribution over the next
token at the answer position is the record's feature. The vocabulary (49k for SmolLM2) would make
the cache 2.3 GB for 11,752 reviews, so the distribution is kept on a fixed `support`: the
tokens with the largest mean probability over a seeded sample of anchors, plus one bin holding
the rest of the mass. The cache is then [N, S+1] float32 (48 MB at S = 1024). A query's distance
to an anchor is KL(anchor || query) over those bins, as in the paper, and the query's label
shares are the votes of its k nearest anchors. Nothing is calibrated: the vote does not read
label probabilities at all.

The anchors depend on the LM, the template, the context and the index version. All of them are
recorded in the manifest and checked at load, and a mismatch is refused with one line saying what
to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from .atomic import publish_dir, read_json, write_json
from .backend import LMBackend
from .prompt import PromptBuilder
from .score import Prefix, compute_prefix, next_token_logprobs

if TYPE_CHECKING:  # faiss (index.py) is not needed to use anchors over an index in memory
    from .index import ExampleIndex

__all__ = ["AnchorConfig", "AnchorError", "Anchors", "KnnPrompter", "build_anchors", "kl_to_anchors", "vote",
           "index_fingerprint",
           "ANCHORS_FORMAT"]

ANCHORS_FORMAT = 1
MANIFEST, TENSORS = "manifest.json", "anchors.safetensors"


class AnchorError(ValueError):
    """Anchors that cannot be built or do not belong to this LM, template or index; one line."""


@dataclass
class AnchorConfig:
    per_label: int = 1  # context demonstrations per label (Xu et al. fill a short context this way)
    support: int = 1024  # vocabulary tokens kept, by mean probability over the sample; + 1 "rest" bin
    sample: int = 256  # anchors whose mean distribution picks the support
    seed: int = 0  # draws the context demonstrations and the sample
    batch_size: int = 16

    def __post_init__(self):
        for name, low in (("per_label", 0), ("support", 1), ("sample", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise AnchorError(f"{name} must be >= {low}, got {getattr(self, name)}")


def context_records(index: ExampleIndex, config: AnchorConfig, pool=None) -> list:
    """`per_label` records of each label, drawn by seed from `pool` (default: the index's
    records), in a seeded order (no label first by rule)."""
    rng = random.Random(config.seed)
    picked = []
    for label in index.labels:
        rows = [r for r in (index.records if pool is None else pool) if r.output == label]
        picked += rng.sample(rows, min(config.per_label, len(rows)))
    rng.shuffle(picked)
    return picked


@dataclass
class Anchors:
    logp: np.ndarray  # [N, S+1] float32: log p over the support tokens, then the rest of the mass
    support: np.ndarray  # [S] int64 token ids
    labels: np.ndarray  # [N] int64: index into `label_names`
    label_names: tuple[str, ...]
    ids: tuple[str, ...]  # record ids, in index order
    context_ids: tuple[str, ...]  # the context demonstrations' record ids
    manifest: dict

    def save(self, folder: str | Path, *, replace: bool = False) -> None:
        """One folder, published by rename: anchors.safetensors + manifest.json. Anchors
        already there are swapped out only with `replace` (never a torn folder either way)."""
        folder = Path(folder)
        if (folder / MANIFEST).exists() and not replace:
            raise AnchorError(f"{folder} already holds anchors; pass replace=True (--force) to replace them")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).exists():
            raise AnchorError(f"{folder} is a folder of other files; anchors go to a new or empty folder")
        with publish_dir(folder, replace=True) as tmp:
            save_file({"logp": self.logp, "support": self.support, "labels": self.labels}, str(tmp / TENSORS))
            write_json(tmp / MANIFEST, {**self.manifest, "ids": list(self.ids)})

    @classmethod
    def load(cls, folder: str | Path, *, lm: LMBackend, builder: PromptBuilder, index: ExampleIndex,
             index_version: str | None = None) -> "Anchors":
        folder = Path(folder)
        if not (folder / MANIFEST).is_file() or not (folder / TENSORS).is_file():
            raise AnchorError(f"{folder} holds no kNN-prompting anchors (build them with `icl anchors build`)")
        m = read_json(folder / MANIFEST, "a kNN-prompting anchors manifest", AnchorError)
        expect = {"lm": lm.name, "template": builder.template.to_dict(), "labels": list(index.labels),
                  "index_sha256": index_fingerprint(index)}
        if index_version is not None:
            expect["index_version"] = index_version
        for key, want in expect.items():
            if m.get(key) != want:
                raise AnchorError(f"{folder}: the anchors were made for another {key.replace('_', ' ')} "
                                  f"({_short(m.get(key))}, not {_short(want)}); rebuild them with `icl anchors build`")
        t = load_file(str(folder / TENSORS))
        ids = tuple(m.pop("ids"))
        if t["logp"].shape[0] != len(ids) or t["logp"].shape[1] != len(t["support"]) + 1:
            raise AnchorError(f"{folder}: anchors.safetensors does not match its manifest")
        return cls(t["logp"], t["support"], t["labels"], tuple(m["labels"]), ids, tuple(m["context"]), m)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def index_fingerprint(index: ExampleIndex) -> str:
    """What the anchors were computed over: the records' ids, texts and labels, in order."""
    h = hashlib.sha256()
    for r in index.records:
        h.update(json.dumps([r.id, r.input, r.output]).encode() + b"\n")
    return h.hexdigest()


class KnnPrompter:
    """Query-time side: the context is run through the LM once (a cached prefix); each query
    costs one short forward over its own tokens, then a [q, S] x [S, N] product."""

    def __init__(self, lm: LMBackend, builder: PromptBuilder, anchors: Anchors, index: ExampleIndex, *,
                 batch_size: int = 16, readout=None, folder: str | Path | None = None):
        self.lm, self.builder, self.anchors, self.batch_size = lm, builder, anchors, batch_size
        self.readout = readout  # readout.LinearReadout: label shares from a fitted linear map, for queries that ask
        self.folder = folder  # where the anchors were loaded from (named in errors)
        by_id = {r.id: r for r in index.records}
        self.context = [by_id[i] for i in anchors.context_ids]
        self.prefix, self.cut = _context_prefix(lm, builder, self.context)
        p = np.exp(anchors.logp.astype(np.float64))  # [N, S+1]
        self.anchor_p = p
        self.anchor_neg_entropy = (p * anchors.logp).sum(1)  # [N]: sum p log p

    def query_ids(self, queries: Sequence[str]) -> list[list[int]]:
        """Each query's own tokens, to follow the cached context."""
        return [self.builder.assemble(self.context, q).ids[self.cut:] for q in queries]

    def query_logp(self, queries: Sequence[str], ids: list[list[int]] | None = None) -> np.ndarray:
        """Each query's distribution on the anchors' support: float32 [q, S+1] (`ids`: its
        query_ids, when the caller has them)."""
        ids = self.query_ids(queries) if ids is None else ids
        full = next_token_logprobs(self.lm, ids, prefix=self.prefix, batch_size=self.batch_size)  # [q, V]
        return on_support(full, self.anchors.support)

    def predict(self, queries: Sequence[str], k: int, *, readout: bool = False, detail: bool = False):
        """Label shares among the k nearest anchors [q, L] (ties between labels go to the
        nearest anchor's label, by a tiny bonus; with `readout`, the fitted linear readout's
        probabilities instead) and those anchors' rows [q, k]; with `detail` also their KL
        distances [q, k] and the tokens the LM read per query (context + query). Anchors are
        rows of the index, in index order."""
        if not 1 <= k <= len(self.anchors.ids):
            raise AnchorError(f"k must be between 1 and the {len(self.anchors.ids)} anchors, got {k}")
        if readout and self.readout is None:
            from .readout import no_readout

            raise AnchorError(no_readout(self.folder or "these anchors"))
        ids = self.query_ids(queries)
        q_logp = self.query_logp(queries, ids)  # [q, S+1]
        d = kl_to_anchors(self.anchor_p, self.anchor_neg_entropy, q_logp)  # [q, N]
        nearest = np.argsort(d, axis=1, kind="stable")[:, :k]  # [q, k]: shown with a readout too
        if readout:
            shares = self.readout.predict(q_logp)  # [q, L]
        else:
            shares = vote(self.anchors.labels[nearest], len(self.anchors.label_names))
        if detail:
            return shares, nearest, np.take_along_axis(d, nearest, axis=1), [self.cut + len(i) for i in ids]
        return shares, nearest


def vote(nearest_labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Label shares [q, L] of each query's nearest anchors' labels [q, k] (nearest first): one
    vote each, weighted 1 + eps/(rank+1), so a tie goes to the label of the nearer anchors."""
    q, k = nearest_labels.shape
    votes = np.zeros((q, n_labels))
    for j in range(k):
        votes[np.arange(q), nearest_labels[:, j]] += 1.0 + 1e-6 / (j + 1)
    return votes / votes.sum(1, keepdims=True)


def kl_to_anchors(anchor_p: np.ndarray, anchor_neg_entropy: np.ndarray, query_logp: np.ndarray) -> np.ndarray:
    """KL(anchor || query) for every pair: sum_s p_a(s) (log p_a(s) - log p_q(s)).
    anchor_p [N, S], anchor_neg_entropy [N] (= sum p_a log p_a), query_logp [q, S] -> [q, N]."""
    return anchor_neg_entropy[None, :] - query_logp.astype(np.float64) @ anchor_p.T


def on_support(logp: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Full-vocabulary log-probs [n, V] -> [n, S+1]: the support tokens, then log of the rest."""
    others = np.ones(logp.shape[1], dtype=bool)
    others[support] = False
    rest = logp[:, others].astype(np.float64)  # [n, V-S]: summed directly, not as 1 - kept (cancellation)
    m = rest.max(1, keepdims=True)
    log_rest = m[:, 0] + np.log(np.exp(rest - m).sum(1))  # [n]
    return np.concatenate([logp[:, support], log_rest[:, None]], axis=1).astype(np.float32)


def _context_prefix(lm: LMBackend, builder: PromptBuilder, context: list) -> tuple[Prefix | None, int]:
    """The cached prefix (bos + instruction + context demonstrations) and where each record's
    own tokens start in an assembled prompt. Anchors and queries both go through this."""
    probe = builder.assemble(context, "x")
    cut = next(s.start for s in probe.spans if s.part == "query")
    return (compute_prefix(lm, probe.ids[:cut]) if cut else None), cut


@torch.inference_mode()
def build_anchors(lm: LMBackend, builder: PromptBuilder, index: ExampleIndex, config: AnchorConfig, *,
                  index_version: str | None = None, progress=None, context_pool=None) -> Anchors:
    """One pass of the LM over every record of the index after the fixed context (drawn from
    `context_pool` when given: records kept apart, a validation split, never show in it)."""
    if len(index) < 2:
        raise AnchorError("kNN prompting needs an index of 2+ records")
    context = context_records(index, config, context_pool)
    prefix, cut = _context_prefix(lm, builder, context)
    ids = [builder.assemble(context, r.input).ids[cut:] for r in index.records]
    rng = np.random.default_rng(config.seed)
    sample = rng.choice(len(ids), size=min(config.sample, len(ids)), replace=False)
    mean = np.exp(next_token_logprobs(lm, [ids[i] for i in sample], prefix=prefix,
                                      batch_size=config.batch_size)).mean(0)  # [V]
    support = np.sort(np.argsort(-mean, kind="stable")[: min(config.support, lm.vocab_size - 1)]).astype(np.int64)
    logp = np.zeros((len(ids), len(support) + 1), dtype=np.float32)
    step = config.batch_size * 16  # a few LM batches at a time: [step, V] float32 stays small
    for s in range(0, len(ids), step):
        logp[s : s + step] = on_support(next_token_logprobs(lm, ids[s : s + step], prefix=prefix,
                                                            batch_size=config.batch_size), support)
        if progress is not None:
            progress(min(s + step, len(ids)), len(ids))
    labels = np.array([index.labels.index(r.output) for r in index.records], dtype=np.int64)
    manifest = {
        "format_version": ANCHORS_FORMAT, "method": "knn_prompting", "lm": lm.name,
        "template": builder.template.to_dict(), "labels": list(index.labels), "index_version": index_version,
        "index_sha256": index_fingerprint(index), "context": [r.id for r in context], "config": asdict(config),
        "n": len(ids), "support_mass_mean": float(np.exp(logp[:, :-1].astype(np.float64)).sum(1).mean()),
    }
    return Anchors(logp, support, labels, tuple(index.labels), tuple(r.id for r in index.records),
                   tuple(r.id for r in context), manifest)
