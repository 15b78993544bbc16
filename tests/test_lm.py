"""load_lm: local folders, dtypes, errors, the one-time GGUF conversion; the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers

from icl_engine.core.choices import DEFAULT_LM
from icl_engine.core.lm import LM, LMLoadError, cache_root, load_lm

from conftest import make_tiny_model, make_tiny_tokenizer
from numerics import assert_scores_close


@pytest.fixture(autouse=True)
def keep_threads():
    """load_lm sets torch's thread count; give other tests back what they had."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny Llama whose tokenizer has no pad token (load_lm must add one)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    make_tiny_model(len(tok)).save_pretrained(folder)
    return folder


def test_load_local_folder(tiny_folder):
    lm = load_lm(str(tiny_folder), device="cpu")
    assert isinstance(lm, LM) and lm.name == str(tiny_folder)
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert not lm.model.training
    assert lm.n_params == sum(p.numel() for p in lm.model.parameters()) > 0
    assert lm.context_length == 512
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token  # batching needs a pad token


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.bfloat16])
def test_dtype_override(tiny_folder, dtype):
    assert load_lm(tiny_folder, device="cpu", dtype=dtype).dtype == torch.bfloat16


def test_errors_are_one_line(tmp_path, tiny_folder):
    cases = [
        (dict(name_or_path=str(tiny_folder), dtype="float7"), "unknown dtype"),
        (dict(name_or_path=str(tmp_path / "nope")), "no model folder"),
        (dict(name_or_path=str(tmp_path)), "no config.json"),
        (dict(name_or_path=str(tmp_path / "x.gguf")), "no such GGUF"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(LMLoadError, match=msg) as e:
            load_lm(device="cpu", **kwargs)
        assert "\n" not in str(e.value)


def test_hub_name_offline_is_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LMLoadError, match="not in the Hugging Face cache") as e:
        load_lm("no-such-org/no-such-model-xyz", device="cpu")
    assert "\n" not in str(e.value)


def test_threads_respect_env(monkeypatch, tiny_folder):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    load_lm(tiny_folder, device="cpu")
    assert torch.get_num_threads() == 1


def fake_gguf_loaders(monkeypatch, fail: bool = False) -> list:
    """Stand-ins for transformers' GGUF parsing (the real one takes ~30 s): return a tiny model
    flagged as quantized, like transformers does, so the conversion must clear the flags."""
    calls = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_from(path, *args, **kw):
        if "gguf_file" not in kw:
            return real_model(path, *args, **kw)
        calls.append(kw["gguf_file"])
        if fail:
            raise OSError("not a GGUF file\nsecond line")
        tok = make_tiny_tokenizer()
        model = make_tiny_model(len(tok))
        model.config.quantization_config = {"quant_method": "gguf"}
        model.hf_quantizer = object()
        return model

    def tok_from(path, *args, **kw):
        return make_tiny_tokenizer() if "gguf_file" in kw else real_tok(path, *args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_from)
    return calls


def test_gguf_converted_once(tmp_path, monkeypatch):
    gguf = tmp_path / "Tiny-Model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    calls = fake_gguf_loaders(monkeypatch)
    lm = load_lm(str(gguf), device="cpu", cache_dir=tmp_path / "cache")
    folder = tmp_path / "cache" / "models" / "tiny-model.q4"
    assert calls == [gguf.name] and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left
    load_lm(str(gguf), device="cpu", cache_dir=tmp_path / "cache")
    assert calls == [gguf.name]  # the second load reads the cached folder
    assert lm.n_params > 0


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"junk")
    fake_gguf_loaders(monkeypatch, fail=True)
    with pytest.raises(LMLoadError, match="cannot convert .*not a GGUF file$"):
        load_lm(str(gguf), device="cpu", cache_dir=tmp_path / "cache")
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ICL_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.slow
def test_default_smollm2(monkeypatch):
    """The packaged GGUF, converted once (~20-40 s the first time), then loaded from the cache."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from icl_engine.core.score import score_continuations

    load_lm()  # converts if needed
    folder = cache_root() / "models" / DEFAULT_LM
    assert (folder / "config.json").is_file()

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF was parsed again instead of using the cached folder")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
    t = time.perf_counter()
    lm = load_lm()
    assert time.perf_counter() - t < 30
    assert lm.model.config.model_type == "llama" and 1e8 < lm.n_params < 2e8
    tok = lm.tokenizer
    prompt = tok("Review: A wonderful, moving film.\nSentiment:").input_ids
    pos, neg = score_continuations(lm, [prompt], [tok(" positive").input_ids, tok(" negative").input_ids])[0]
    assert pos > neg


@pytest.mark.slow
def test_compile_scores_as_eager():
    """LM.compile (torch.compile, dynamic shapes): the same scores as the eager forward, over two
    batches of different lengths and a two-token label (the packed label pass); compile_lm is
    idempotent and refuses, in one line, a backend that cannot compile."""
    from icl_engine.core.lm import compile_lm
    from icl_engine.core.score import compute_prefix, score_continuations

    from conftest import make_tiny_lm

    tok = make_tiny_tokenizer()
    lm = make_tiny_lm(tok, num_hidden_layers=1)  # one layer: the compile's time grows with the graph
    prefix = compute_prefix(lm, ids=tok.encode("Classify the review."))
    rows = [tok.encode(t) for t in ("a great film", "dull", "the acting was wonderful and the plot great", "boring")]
    labels = [tok.encode(" positive"), tok.encode(" negative film")]
    assert max(map(len, labels)) >= 2 and len({len(r) for r in rows}) > 2
    eager = score_continuations(lm, rows, labels, prefix=prefix, batch_size=2)
    assert compile_lm(lm) is lm and lm.compiled
    forward = lm.model.forward
    compile_lm(lm)
    assert lm.model.forward is forward  # compiled once
    compiled = score_continuations(lm, rows, labels, prefix=prefix, batch_size=2)
    assert_scores_close(compiled, eager, lm)  # fused kernels: another order of the same sums

    class NoCompile:
        pass

    with pytest.raises(LMLoadError, match="cannot compile") as e:
        compile_lm(NoCompile())
    assert "\n" not in str(e.value)
