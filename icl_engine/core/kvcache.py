"""Demonstration KV caches ("cached" scoring): every record's demonstration is run through the LM
once, and its keys and values in every layer are stored with the index, so that a query runs only
its own tokens and reads its demonstrations' keys and values from the cache.

    manifest = build_kv_cache(lm, builder, index, kv_folder(folder), index_version=v)  # icl index cache NAME
    cache = KVCache.load(kv_folder(folder), lm=lm, builder=builder, index=index, index_version=v)
    pending = score_cached(lm, cache, prefix, prompts, rows, labels, budgets=[8192] * len(prompts), answer=1)

A block is one record's demonstration followed by the separator (`demo_ids(r) + sep_ids`), run
alone after the shared prefix (bos + instruction + separator, `builder.shared_ids()`): every block
has read the instruction, none has read another demonstration. An assembled prompt is exactly
prefix + block + ... + block + query, so only where the blocks attend differs from exact scoring:
within its own block (and the prefix) instead of every earlier demonstration. The query and the
answer tokens attend to the prefix, every block and themselves, as in the exact prompt.

Positions. RoPE turns each pair of a key's dimensions by an angle proportional to its position,
so a stored key is moved to another position exactly by one more rotation (`HFBackend.move_keys`,
with the model's own rotary embedding). Two layouts:
  - sequential (TurboRAG, Lu et al. 2024), when prefix + blocks + query + the longest answer fit
    the budget (default: the LM's context): each block moves to where it sits in the assembled
    prompt, and the query gets the positions it has there. With one demonstration this IS exact
    scoring; with more, only the blocks' blindness to each other differs.
  - position reuse (structured prompting, Hao et al. 2022), when they do not fit (many-shot):
    every block keeps positions right after the prefix, right-aligned as in Hao et al. (each
    block ends where the longest one ends, so every demonstration's answer sits just before the
    query, as the last demonstration's does in a prompt), and the query follows the longest
    block. Positions then never exceed what the model was trained on, whatever k is; the model
    sees k demonstrations "in parallel", which it was not trained for. `rescale` applies Hao et
    al.'s rescaled attention there (each block's tokens' attention weights divided by the number
    of blocks, as a -log(k) bias on their attention logits); off by default, and not a query
    option. Measured with SmolLM2, reuse costs accuracy against sequential positions (SNIPS,
    k = 64: 5.8 points; benchmarks/results/kv_cache/reuse), so it is the fallback only.
The budget never drops a demonstration in cached scoring: all k are kept (select.py is asked
with no budget), and the layout alone changes when they do not fit.

Storage: one memory-mapped array [tokens, layers, 2, H_kv, D] (the blocks of all records, in
index order; `offsets` [records + 1] says where each starts), in bfloat16 (default), int8 with one
float32 scale per token, layer, key/value and head, or float32. A query gathers its blocks' rows
(one index_select), converts them to the LM's dtype, and moves the keys. SmolLM2-135M: 30 layers
x 2 x 3 heads x 64 = 11,520 numbers a token, 23,040 bytes in bfloat16 (12,240 in int8).

The cache is tied to the LM (name and config), the template, the labels and the index version
(and the records' fingerprint), all in its manifest: any change is refused with one line saying to
rebuild it. It lives in the index's folder (kvcache/, a versioned store like the index's own:
published by one atomic pointer switch); building a new one removes the old.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from . import cancel
from .atomic import read_json, write_json
from .backend import Ids, LMBackend, Prefix
from .choices import KVDType
from .knn_prompt import index_fingerprint
from .prompt import Prompt, PromptBuilder
from .score import PendingScores, check_inputs, compute_prefix, length_batches

if TYPE_CHECKING:  # faiss (index.py) is not needed to score over an index in memory
    from .index import ExampleIndex

__all__ = ["KVCache", "KVCacheError", "build_kv_cache", "kv_cache_in_memory", "score_cached", "kv_folder",
           "lm_signature", "encode", "decode", "KV_FORMAT", "MAX_PAST_BYTES"]

KV_FORMAT = 1
MANIFEST, DATA, SCALES, OFFSETS = "manifest.json", "kv.bin", "scales.bin", "offsets.npy"
FOLDER = "kvcache"  # inside the index's folder
MAX_PAST_BYTES = 512 * 2**20  # a scoring batch's gathered keys/values (in the LM's dtype) stay below this
_STORED = {KVDType.BFLOAT16: torch.int16, KVDType.INT8: torch.int8, KVDType.FLOAT32: torch.float32}
_NUMPY = {torch.int16: np.int16, torch.int8: np.int8, torch.float32: np.float32}
_WHAT = {"format_version": "format", "lm": "LM", "lm_config_sha256": "LM config", "template": "template",
         "labels": "label set", "prefix_ids": "prefix", "separator_ids": "separator", "index_version": "index version",
         "records": "number of records", "index_sha256": "set of records"}  # manifest entries, as a refusal names them
# config entries that say nothing about the function the model computes
_NOT_THE_MODEL = {"transformers_version", "dtype", "torch_dtype", "use_cache", "architectures"}


class KVCacheError(ValueError):
    """A KV cache that is missing, cannot be built, or belongs to another LM, template or index
    version; one line."""


def kv_folder(index_folder: str | Path) -> Path:
    """Where the KV cache of the index in `index_folder` lives."""
    return Path(index_folder) / FOLDER


def lm_signature(lm: LMBackend) -> str:
    """What the cached keys and values depend on besides the LM's name: its architecture config
    (sha256 of it, entries about loading left out)."""
    config = getattr(getattr(lm, "model", None), "config", None)
    d = config.to_dict() if config is not None else {}
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _NOT_THE_MODEL}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- number formats


def encode(x: torch.Tensor, dtype: KVDType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float keys/values [..., D] -> (stored [..., D], scales [...] float32 for int8 else None).
    int8: symmetric, one scale per vector of D numbers (a token's head), max |x| -> 127."""
    x = x.float()
    if dtype is KVDType.BFLOAT16:
        return x.to(torch.bfloat16).view(torch.int16), None
    if dtype is KVDType.INT8:
        amax = x.abs().amax(-1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero vector stays zero
        return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale
    return x, None


def decode(stored: torch.Tensor, scales: torch.Tensor | None, dtype: KVDType) -> torch.Tensor:
    """`encode`'s inverse, as float32."""
    if dtype is KVDType.BFLOAT16:
        return stored.view(torch.bfloat16).float()
    if dtype is KVDType.INT8:
        return stored.float() * scales[..., None]
    return stored.float()


# ----------------------------------------------------------------------------- the cache


@dataclass
class KVCache:
    manifest: dict
    data: torch.Tensor  # [N_tok, layers, 2, H_kv, D]: int16 (bfloat16 bits), int8 or float32; memory-mapped
    scales: torch.Tensor | None  # [N_tok, layers, 2, H_kv] float32 (int8 only)
    offsets: np.ndarray  # int64 [N+1]: record r's block is data[offsets[r]:offsets[r+1]]
    version: str | None = None  # the store version it was read from

    @property
    def dtype(self) -> KVDType:
        return KVDType(self.manifest["dtype"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # int64 [N]: each record's block length (demonstration + separator)

    def gather(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored rows of `tokens` (int64 [M]): ([M, layers, 2, H, D], scales [M, layers, 2, H] or None)."""
        return self.data.index_select(0, tokens), None if self.scales is None else self.scales.index_select(0, tokens)

    @classmethod
    def load(cls, folder: str | Path, *, lm: LMBackend, builder: PromptBuilder, index: ExampleIndex,
             index_version: str | None = None, name: str | None = None) -> "KVCache":
        """The cache in `folder` (kv_folder of an index), checked against the LM, template,
        labels and records (and index version, when given) it is used with."""
        from .index import store

        folder = Path(folder)
        name = name or folder.parent.name
        rebuild = f"rebuild it with `icl index cache {name}`"
        try:
            return store.read(folder, lambda v: cls._read(v, lm, builder, index, index_version, rebuild))
        except store.StoreError:
            raise KVCacheError(f"index {name!r} has no KV cache (cached scoring reads one); build it with "
                               f"`icl index cache {name}`") from None

    @classmethod
    def _read(cls, version: Path, lm, builder, index, index_version, rebuild: str) -> "KVCache":
        m = read_json(version / MANIFEST, "a KV cache manifest", KVCacheError)
        expect = {"format_version": KV_FORMAT, "lm": lm.name, "lm_config_sha256": lm_signature(lm),
                  "template": builder.template.to_dict(), "labels": list(index.labels),
                  "prefix_ids": builder.shared_ids(), "separator_ids": list(builder.sep_ids),
                  "index_version": index_version, "records": len(index), "index_sha256": index_fingerprint(index)}
        for key, want in expect.items():
            if (key != "index_version" or want is not None) and m.get(key) != want:
                raise KVCacheError(f"the KV cache was built for another {_WHAT[key]} ({_differs(m.get(key), want)}); "
                                   f"{rebuild}")
        stored = _STORED[KVDType(m["dtype"])]
        shape = (m["tokens"], m["layers"], 2, m["kv_heads"], m["head_dim"])
        data = _mapped(version / DATA, stored, shape, rebuild)
        scales = _mapped(version / SCALES, torch.float32, shape[:-1], rebuild) if m["dtype"] == KVDType.INT8.value \
            else None
        offsets = np.load(version / OFFSETS, allow_pickle=False)
        if offsets.shape != (len(index) + 1,) or offsets[-1] != m["tokens"]:
            raise KVCacheError(f"{version}: the KV cache's offsets do not match its manifest; {rebuild}")
        return cls(m, data, scales, offsets.astype(np.int64), version.name)


def _mapped(path: Path, dtype: torch.dtype, shape: tuple[int, ...], rebuild: str) -> torch.Tensor:
    """A read-only file as a tensor, memory-mapped: pages are read when a query gathers them.
    (Copy-on-write mapping: torch wants a writable array; nothing is ever written back.)"""
    want = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if not path.is_file() or path.stat().st_size != want:
        raise KVCacheError(f"{path}: missing or not {want} bytes; {rebuild}")
    if want == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.memmap(path, dtype=_NUMPY[dtype], mode="c", shape=shape))


def _differs(had, want) -> str:
    """What differs, short: the first differing entry of two dicts (a template), else both values."""
    if isinstance(had, dict) and isinstance(want, dict):
        key = next(k for k in sorted(set(had) | set(want)) if had.get(k) != want.get(k))
        return f"{key} {_short(had.get(key))}, not {_short(want.get(key))}"
    return f"{_short(had)}, not {_short(want)}"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------- building


def _blocks(builder: PromptBuilder, index: ExampleIndex) -> list[list[int]]:
    """Each record's block: its demonstration as a prompt holds it, then the separator."""
    builder.demo_lengths(index.records)(np.arange(len(index)))  # tokenizes every record in one call
    return [builder.demo_ids(r) + builder.sep_ids for r in index.records]


def _store_rows(kv: torch.Tensor, lens: torch.Tensor, rows, offsets: np.ndarray, dtype: KVDType,
                data: np.ndarray, scales: np.ndarray | None) -> None:
    """Copy a batch's keys and values kv [B, layers, 2, H, T, D] (left-padded to T; row b holds
    lens[b] tokens) to each record's token range offsets[r]:offsets[r+1], encoded as `dtype`."""
    T = kv.shape[4]
    for b, r in enumerate(rows):
        n = int(lens[b])
        x = kv[b, :, :, :, T - n:].permute(3, 0, 1, 2, 4)  # [n, layers, 2, H, D]: its tokens, left padding cut
        q, s = encode(x.cpu(), dtype)
        data[offsets[r]: offsets[r + 1]] = q.numpy()
        if s is not None:
            scales[offsets[r]: offsets[r + 1]] = s.numpy()


def _bytes_per_token(geometry: dict, dtype: KVDType) -> int:
    """What one cached token costs on disk: a key and a value per layer and head (+ int8's scales)."""
    vectors = geometry["layers"] * 2 * geometry["kv_heads"]
    per_token = vectors * geometry["head_dim"] * torch.empty(0, dtype=_STORED[dtype]).element_size()
    return per_token + (vectors * 4 if dtype is KVDType.INT8 else 0)  # int8: a float32 scale per vector


@torch.inference_mode()
def build_kv_cache(lm: LMBackend, builder: PromptBuilder, index: ExampleIndex, folder: str | Path, *,
                   index_version: str | None = None, dtype: KVDType | str = KVDType.BFLOAT16, batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Run every record's block through the LM after the prefix and publish the cache in
    `folder` (kv_folder of the index); returns its manifest. `progress(n)` hears of each n
    records done. A cache already there (of any LM, template or index version) is replaced."""
    dtype = KVDType(dtype)
    t0 = time.perf_counter()
    manifest = _manifest(lm, builder, index, index_version, dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        # streamed to memory-mapped files: a large index's cache never has to fit in memory
        data, scales, offsets = _compute(lm, builder, index, dtype, batch_size, progress, manifest,
                                         lambda name, np_dtype, shape: np.memmap(tmp / name, dtype=np_dtype,
                                                                                 mode="w+", shape=shape))
        data.flush()
        if scales is not None:
            scales.flush()
        np.save(tmp / OFFSETS, offsets, allow_pickle=False)
        manifest["seconds"] = time.perf_counter() - t0
        write_json(tmp / MANIFEST, manifest)

    from .index import store

    with store.writer_lock(folder, what=f"the KV cache in {folder}"):
        final = store.publish(folder, write)
        store.collect_garbage(folder, keep={final.name})  # the old cache goes now: it is as big as this one
    return {**manifest, "path": str(final)}


@torch.inference_mode()
def kv_cache_in_memory(lm: LMBackend, builder: PromptBuilder, index: ExampleIndex, *,
                       dtype: KVDType | str = KVDType.BFLOAT16, batch_size: int = 16) -> KVCache:
    """The cache build_kv_cache publishes, held in memory instead: for an index that lives in
    memory (ICLClassifier), where nothing is to be written to disk."""
    dtype = KVDType(dtype)
    t0 = time.perf_counter()
    manifest = _manifest(lm, builder, index, None, dtype)
    data, scales, offsets = _compute(lm, builder, index, dtype, batch_size, None, manifest,
                                     lambda name, np_dtype, shape: np.empty(shape, dtype=np_dtype))
    manifest["seconds"] = time.perf_counter() - t0
    return KVCache(manifest, torch.from_numpy(data), None if scales is None else torch.from_numpy(scales), offsets)


def _manifest(lm: LMBackend, builder: PromptBuilder, index: ExampleIndex, index_version: str | None,
              dtype: KVDType) -> dict:
    """What a cache is tied to (KVCache._read checks each entry) and how it stores its numbers."""
    if not hasattr(lm, "block_kv"):
        raise KVCacheError(f"LM backend {type(lm).__name__} cannot hand out keys and values")
    if len(index) == 0:
        raise KVCacheError("the index holds no records")
    return {
        "format_version": KV_FORMAT, "lm": lm.name, "lm_config_sha256": lm_signature(lm),
        "lm_dtype": str(getattr(lm, "dtype", "")).replace("torch.", ""), "dtype": dtype.value,
        "template": builder.template.to_dict(), "labels": list(index.labels), "prefix_ids": builder.shared_ids(),
        "separator_ids": list(builder.sep_ids), "records": len(index), "index_version": index_version,
        "index_sha256": index_fingerprint(index),
    }


def _compute(lm: LMBackend, builder: PromptBuilder, index: ExampleIndex, dtype: KVDType, batch_size: int,
             progress: Callable[[int], None] | None, manifest: dict, alloc: Callable):
    """Every record's block run after the prefix, stored into arrays from `alloc(file name,
    numpy dtype, shape)`: (data [tokens, layers, 2, H, D], scales [tokens, layers, 2, H] or None,
    offsets int64 [records + 1]). The geometry and sizes are added to `manifest`."""
    shared = builder.shared_ids()
    prefix = compute_prefix(lm, ids=shared) if shared else None
    blocks = _blocks(builder, index)
    offsets = np.concatenate([[0], np.cumsum(np.fromiter(map(len, blocks), np.int64, len(blocks)))])
    n_tok = int(offsets[-1])
    data = scales = None
    for rows in length_batches(blocks, batch_size, bucket=True):
        cancel.check()
        kv, lens = lm.block_kv([blocks[r] for r in rows], prefix)  # [B, layers, 2, H, T, D], [B]
        if data is None:  # the shapes are known once the LM has run
            _, layers, _, heads, _, dim = kv.shape
            manifest.update(layers=layers, kv_heads=heads, head_dim=dim)
            data = alloc(DATA, _NUMPY[_STORED[dtype]], (n_tok, layers, 2, heads, dim))
            if dtype is KVDType.INT8:
                scales = alloc(SCALES, np.float32, (n_tok, layers, 2, heads))
        _store_rows(kv, lens, rows, offsets, dtype, data, scales)
        if progress is not None:
            progress(len(rows))
    per_token = _bytes_per_token(manifest, dtype)
    manifest.update(tokens=n_tok, bytes=per_token * n_tok, bytes_per_token=per_token,
                    bytes_per_record=per_token * n_tok / len(blocks))
    return data, scales, offsets


# ----------------------------------------------------------------------------- scoring


@dataclass
class _Layout:
    """Where one prompt's pieces go: its blocks (records) and the positions the LM gives them."""

    rows: np.ndarray  # int64 [k] records, in prompt order
    starts: np.ndarray  # int64 [k] position of each block's first token
    query: list[int]  # the tokens run: the query (and a chat template's suffix)
    query_start: int  # position of the query's first token
    reuse: bool  # position reuse (blocks side by side) rather than sequential


def _layout(prompt: Prompt, rows: np.ndarray, lengths: np.ndarray, P: int, budget: int, answer: int) -> _Layout:
    n = lengths[rows]  # [k]
    if prompt.shared_len != P or len(prompt.demos) != len(n) or \
            any(m + prompt.sep != x for (_, m), x in zip(prompt.demos, n.tolist())):
        raise KVCacheError("the KV cache's blocks are not the prompt's demonstrations (another tokenizer?); "
                           "rebuild it with `icl index cache`")
    query = prompt.ids[P + int(n.sum()):]
    if len(prompt.ids) + answer <= budget:  # sequential: every block where the assembled prompt has it
        starts = P + np.cumsum(n) - n
        return _Layout(rows, starts, query, P + int(n.sum()), False)
    longest = int(n.max(initial=0))  # position reuse, right-aligned
    return _Layout(rows, P + longest - n, query, P + longest, True)


def score_cached(lm: LMBackend, cache: KVCache, prefix: Prefix | None, prompts: Sequence[Prompt],
                 rows: Sequence[np.ndarray], continuations: Ids, *, budgets: Sequence[int], answer: int,
                 batch_size: int = 8, rescale: bool = False, max_past_bytes: int = MAX_PAST_BYTES) -> PendingScores:
    """log p(continuation j | prompt i) [q, L], each prompt's demonstrations (records `rows[i]`,
    in prompt order) read from `cache`, only its query (and the continuations) run. `budgets[i]`:
    the tokens prompt i + its longest answer (`answer`) may take for the sequential layout;
    beyond, position reuse (module doc). `rescale`: Hao et al.'s rescaled attention for the
    prompts laid out with position reuse."""
    if not hasattr(lm, "score_after"):
        raise KVCacheError(f"LM backend {type(lm).__name__} cannot score after cached keys and values")
    P = prefix.length if prefix is not None else 0
    if P != len(cache.manifest["prefix_ids"]):
        raise KVCacheError("cached scoring needs the prefix the cache was built after (no soft prompt)")
    lengths = cache.lengths
    plans = [_layout(p, np.asarray(r, np.int64), lengths, P, b, answer) for p, r, b in zip(prompts, rows, budgets)]
    check_inputs(lm, [p.query for p in plans], continuations, None)
    past_len = [int(lengths[p.rows].sum()) for p in plans]
    per_token = cache.data[0].numel() * torch.empty(0, dtype=lm.dtype).element_size()  # bytes a past token takes
    parts = []
    for idx in _batches([len(p.query) for p in plans], past_len, P, batch_size, max_past_bytes // max(per_token, 1)):
        cancel.check()  # a server's abandoned work ends here, at an LM batch boundary
        past, see, bias, starts = _past(lm, cache, prefix, [plans[i] for i in idx], rescale)
        s = lm.score_after(past, see, [plans[i].query for i in idx], starts, continuations, bias)  # [B, L]
        parts.append((idx, s.cpu()))
    return PendingScores((len(prompts), len(continuations)), parts)


def _batches(run_len: list[int], past_len: list[int], P: int, batch_size: int, max_tokens: int) -> list[list[int]]:
    """Prompts sorted by the tokens run (padding there costs whole forwards), then by cached
    length, cut into batches of at most batch_size prompts whose padded past (rows x longest)
    stays under max_tokens (one prompt always goes, however long)."""
    order = sorted(range(len(past_len)), key=lambda i: (run_len[i], past_len[i]))
    out, cur, longest = [], [], 0
    for i in order:
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * (P + max(longest, past_len[i])) > max_tokens):
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, past_len[i])
    return out + ([cur] if cur else [])


def _past(lm: LMBackend, cache: KVCache, prefix: Prefix | None, plans: Sequence[_Layout], rescale: bool):
    """The batch's past: per layer (key, value) [B, H, P+S, D] in the LM's dtype (prefix, then each
    row's blocks, padded to the longest), which positions each row sees [B, P+S], the attention
    bias (None, or Hao et al.'s -log k on the blocks of reused rows) and each query's start [B]."""
    P, B = (prefix.length if prefix is not None else 0), len(plans)
    lengths, offsets = cache.lengths, cache.offsets
    n = [lengths[p.rows] for p in plans]
    S = max(int(x.sum()) for x in n)
    tokens = np.zeros((B, S), np.int64)  # row of the cache each past position reads (0 on padding)
    stored = np.zeros((B, S), np.int64)  # the position its key was computed at
    target = np.zeros((B, S), np.int64)  # the position it takes now
    see = np.zeros((B, P + S), bool)
    see[:, :P] = True
    for b, (plan, nb) in enumerate(zip(plans, n)):
        m = int(nb.sum())
        within = np.arange(m) - np.repeat(np.cumsum(nb) - nb, nb)  # each token's offset inside its block
        tokens[b, :m] = np.repeat(offsets[plan.rows], nb) + within
        stored[b, :m] = P + within
        target[b, :m] = np.repeat(plan.starts, nb) + within
        see[b, P: P + m] = True
    layers, _, heads, dim = cache.data.shape[1:]
    data, scales = cache.gather(torch.from_numpy(tokens.reshape(-1)))  # [B*S, layers, 2, H, D]
    if scales is not None:
        data = decode(data, scales, cache.dtype)
    elif cache.dtype is KVDType.BFLOAT16:
        data = data.view(torch.bfloat16)
    past = torch.empty(layers, 2, B, heads, P + S, dim, dtype=lm.dtype)
    past[:, :, :, :, P:].copy_(data.view(B, S, layers, 2, heads, dim).permute(2, 3, 0, 4, 1, 5))
    if P:
        for i, (k, v) in enumerate(prefix.past_key_values):
            past[i, 0, :, :, :P] = k[0].to(past)
            past[i, 1, :, :, :P] = v[0].to(past)
    if (stored != target).any():  # keys move to their new positions, in place: [layers, B, H, S, D], positions [B, 1, S]
        lm.move_keys(past[:, 0, :, :, P:], torch.from_numpy(stored)[:, None], torch.from_numpy(target)[:, None])
    bias = None
    if rescale and any(p.reuse for p in plans):
        b_np = np.zeros((B, P + S), np.float32)
        for b, (plan, nb) in enumerate(zip(plans, n)):
            if plan.reuse and len(nb) > 1:
                b_np[b, P: P + int(nb.sum())] = -np.log(len(nb))
        bias = torch.from_numpy(b_np)
    starts = torch.tensor([p.query_start for p in plans], dtype=torch.long)
    device = getattr(lm, "device", torch.device("cpu"))
    past = past.to(device)
    layers_kv = [(past[i, 0], past[i, 1]) for i in range(layers)]
    return layers_kv, torch.from_numpy(see).to(device), None if bias is None else bias.to(device), starts
