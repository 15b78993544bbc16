"""Embedders: the hashing baseline, stable names, the on-disk cache, and (slow) the packaged MiniLM."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from icl_engine.core import embed
from icl_engine.core.choices import DEFAULT_EMBEDDER
from icl_engine.core.embed import Embedder, EmbedderError, canonical_name, get_embedder

TEXTS = ["the movie was great", "a dull boring film", "great acting, great movie", "", "Über café déjà vu"]


def count_embedded(emb: Embedder) -> list[str]:
    """Wrap the model call (below the cache) and record every text it embeds."""
    seen: list[str] = []
    inner = emb._embed

    def wrapped(texts):
        seen.extend(texts)
        return inner(texts)

    emb._embed = wrapped
    return seen


def test_hashing_is_unit_norm_and_deterministic():
    emb = get_embedder("hashing:64")
    v = emb.encode(TEXTS)
    assert v.dtype == np.float32 and v.shape == (len(TEXTS), 64) and emb.dim == 64
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(v, get_embedder("hashing:64").encode(TEXTS))
    # lexical: sharing words scores higher than sharing none
    assert v[0] @ v[2] > v[0] @ v[1]
    # case-insensitive, and a text encodes the same alone or in a batch
    np.testing.assert_array_equal(emb.encode(["THE MOVIE WAS GREAT"])[0], v[0])


def test_hashing_is_stable_across_processes():
    code = ("from icl_engine.core.embed import get_embedder; "
            "print(get_embedder('hashing:32').encode(['a b c d']).tobytes().hex())")
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert outs == {get_embedder("hashing:32").encode(["a b c d"]).tobytes().hex() + "\n"}


@pytest.mark.parametrize("bad", ["hashing:0", "hashing:x", "hashing:"])
def test_bad_hashing_spec_is_a_one_line_error(bad):
    with pytest.raises(EmbedderError, match="hashing:DIM"):
        Embedder(bad)


def test_stable_names():
    assert canonical_name(DEFAULT_EMBEDDER) == DEFAULT_EMBEDDER
    assert canonical_name("sentence-transformers/all-MiniLM-L6-v2") == DEFAULT_EMBEDDER
    packaged = embed._packaged_dir()
    if packaged is not None:  # the site-packages path is not what goes into a manifest
        assert canonical_name(str(packaged)) == DEFAULT_EMBEDDER
    assert canonical_name("hashing:064") == "hashing:64"
    assert Embedder().name == DEFAULT_EMBEDDER  # no loading needed for the name


def test_encode_edge_cases():
    emb = Embedder("hashing:16")
    with pytest.raises(RuntimeError, match="load"):
        emb.encode(["x"])
    emb.load()
    assert emb.encode([]).shape == (0, 16)
    with pytest.raises(EmbedderError, match="text 1"):
        emb.encode(["ok", 3])
    with pytest.raises(EmbedderError, match="batch_size"):
        Embedder("hashing:16", batch_size=0)


def test_cache_hits_return_identical_vectors(tmp_path):
    first = get_embedder("hashing:64", cache_dir=tmp_path)
    v1 = first.encode(TEXTS + [TEXTS[0]])  # a duplicate is embedded once
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1

    second = get_embedder("hashing:64", cache_dir=tmp_path)  # a fresh process, in effect
    seen = count_embedded(second)
    v2 = second.encode(["a new text", *TEXTS])
    assert seen == ["a new text"]  # only the unknown text reaches the model
    np.testing.assert_array_equal(v2[1:], v1[:-1])
    assert second.encode(["a new text"]).tobytes() == v2[0].tobytes()


def test_cache_env_var_and_disable(tmp_path, monkeypatch):
    monkeypatch.setenv("ICL_CACHE", str(tmp_path))
    emb = get_embedder("hashing:8", cache_dir=None)
    assert emb.cache is None  # hashing is faster to recompute than to read back
    assert embed.embedding_cache_dir() == tmp_path / "embeddings"
    assert get_embedder("hashing:8", cache_dir=False).cache is None


def test_corrupt_shard_is_ignored_and_reembedded(tmp_path):
    v1 = get_embedder("hashing:64", cache_dir=tmp_path).encode(TEXTS)
    [shard] = tmp_path.rglob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the vectors: only the checksum can tell
    shard.write_bytes(bytes(data))

    emb = get_embedder("hashing:64", cache_dir=tmp_path)
    seen = count_embedded(emb)
    with pytest.warns(UserWarning, match="corrupt embedding cache shard"):
        v2 = emb.encode(TEXTS)
    assert sorted(seen) == sorted(TEXTS)  # nothing was taken from the bad shard
    np.testing.assert_array_equal(v1, v2)

    [good] = tmp_path.rglob("*.safetensors")  # the bad shard is gone, a good one replaced it
    good.write_bytes(good.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="corrupt"):
        np.testing.assert_array_equal(get_embedder("hashing:64", cache_dir=tmp_path).encode(TEXTS), v1)


def test_many_small_writes_are_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "_MAX_SHARDS", 3)
    emb = get_embedder("hashing:16", cache_dir=tmp_path)
    texts = [f"text number {i}" for i in range(10)]
    ref = np.stack([emb.encode([t])[0] for t in texts])  # ten one-text writes
    assert len(list(tmp_path.rglob("*.safetensors"))) <= 4
    fresh = get_embedder("hashing:16", cache_dir=tmp_path)
    seen = count_embedded(fresh)
    np.testing.assert_array_equal(fresh.encode(texts), ref)
    assert seen == []


def test_progress_bar_does_not_change_results():
    emb = get_embedder("hashing:16")
    texts = [f"t {i}" for i in range(30)]
    np.testing.assert_array_equal(emb.encode(texts, show_progress=True), emb.encode(texts, show_progress=False))


def test_unwritable_cache_warns_and_still_encodes(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    emb = get_embedder("hashing:16", cache_dir=blocker)  # the model folder cannot be created
    with pytest.warns(UserWarning, match="could not write the embedding cache"):
        v = emb.encode(TEXTS)
    np.testing.assert_array_equal(v, get_embedder("hashing:16").encode(TEXTS))


@pytest.mark.slow
def test_packaged_minilm(tmp_path):
    emb = get_embedder(DEFAULT_EMBEDDER, cache_dir=tmp_path, device="cpu")
    assert emb.name == "all-MiniLM-L6-v2" and emb.dim == 384
    texts = ["The film was wonderful and moving.", "A beautiful, touching movie.", "The invoice is due on Monday."]
    v = emb.encode(texts)
    assert v.dtype == np.float32 and v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    # matches sentence-transformers itself, and the cache gives back the same vectors
    raw = emb.sentence_transformer.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(v, raw, atol=1e-5)
    again = get_embedder(DEFAULT_EMBEDDER, cache_dir=tmp_path, device="cpu")
    seen = count_embedded(again)
    np.testing.assert_array_equal(again.encode(texts), v)
    assert seen == []


def test_default_batch_size_follows_the_device():
    import torch

    from icl_engine.core.embed import BATCH_SIZE, batch_size_for

    assert batch_size_for("cpu") == BATCH_SIZE["cpu"] == 64
    assert batch_size_for(torch.device("cuda", 1)) == batch_size_for("cuda:0") == BATCH_SIZE["cuda"] == 1024
    assert batch_size_for("mps") == 64  # unknown devices: the CPU's
    assert Embedder("hashing:16").batch_size is None and Embedder("hashing:16", batch_size=8).batch_size == 8
