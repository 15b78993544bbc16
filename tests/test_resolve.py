"""The one resolver (config -> index folder, template, LM, adapter), the built-in registry and
the engine cache."""

from __future__ import annotations

import json

import pytest

from icl_engine.core.config import ConfigError, PipelineConfig
from icl_engine.core.data import DataError, Dataset, TaskKind, load_dataset, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.engines import EngineCache, get_engine
from icl_engine.core.index import ExampleIndex
from icl_engine.core.prompt import Template
from icl_engine.core.registry import BUILTINS, INTENT_TEMPLATE, SENTIMENT_TEMPLATE, builtin, data_dir
from icl_engine.core.resolve import resolve
from icl_engine.core.templates import resolve_template

from conftest import SHARED_DATA, make_tiny_model, make_tiny_tokenizer

ROWS = [("a wonderful film", "positive"), ("a dull boring film", "negative"), ("great acting", "positive"),
        ("terrible plot", "negative")]
STORED = Template(instruction="stored with the index", input_format="R: {input}\nS:", output_format=" {output}")
GIVEN = Template(instruction="given", input_format="G: {input}\n", output_format="{output}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resolve")
    tok = make_tiny_tokenizer()
    lm_dir = root / "tiny-lm"
    make_tiny_model(len(tok)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    ds = Dataset("rotten_tomatoes:train", TaskKind.CLASSIFICATION, make_records(ROWS), ("negative", "positive"))
    ExampleIndex.build(ds, get_embedder("hashing:64")).save(root / "indexes" / "plain")
    ExampleIndex.build(ds, get_embedder("hashing:64")).save(root / "indexes" / "stored", template=STORED.to_dict())
    return root, lm_dir


# ----------------------------------------------------------------------------- registry


def test_builtin_names_follow_one_convention():
    assert builtin("rotten_tomatoes") is BUILTINS["rotten_tomatoes"]
    assert builtin("rotten_tomatoes:train[16@0]").template == SENTIMENT_TEMPLATE
    assert builtin("snips_intents:test").template == INTENT_TEMPLATE
    # a file named like a split is not the built-in (the old name-cutting guess took it for one)
    assert builtin("rotten_tomatoes_train") is None and builtin("imdb") is None and builtin("") is None


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ICL_SHARED_DATA", raising=False)
    assert data_dir() == data_dir(None) and data_dir().parts[-2:] == ("shared", "data")
    monkeypatch.setenv("ICL_SHARED_DATA", str(tmp_path))
    assert data_dir() == tmp_path and data_dir(tmp_path / "x") == tmp_path / "x"


def test_builtin_splits_are_named_by_the_convention(tmp_path):
    with pytest.raises(DataError, match="snips_intents.jsonl"):
        BUILTINS["snips_intents"].splits(tmp_path)
    if not (SHARED_DATA / "snips_intents.jsonl").exists():
        pytest.skip("needs ../shared/data/snips_intents.jsonl")
    pool, test = BUILTINS["snips_intents"].splits(SHARED_DATA)
    assert (pool.name, test.name) == ("snips_intents:train", "snips_intents:test")
    assert set(pool.labels) == set(BUILTINS["snips_intents"].labels)
    assert builtin(pool.subsample(8, 0).name) is BUILTINS["snips_intents"]


def test_builtin_split_names_load_from_the_shared_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("ICL_SHARED_DATA", str(tmp_path))
    with pytest.raises(DataError, match="snips_intents.jsonl"):  # absent: one line naming the file
        load_dataset("snips_intents:test")
    if not (SHARED_DATA / "snips_intents.jsonl").exists():
        pytest.skip("needs ../shared/data/snips_intents.jsonl")
    monkeypatch.setenv("ICL_SHARED_DATA", str(SHARED_DATA))
    pool, test = BUILTINS["snips_intents"].splits(SHARED_DATA)
    for name, want in (("snips_intents:train", pool), ("snips_intents:test", test)):
        got = load_dataset(name, kind="classification")
        assert (got.name, got.records, got.labels) == (want.name, want.records, want.labels)
    assert load_dataset("snips_intents:train[8@1]").records == pool.subsample(8, 1).records
    order = tuple(reversed(pool.labels))  # a test file read with the index's label order keeps it
    assert load_dataset("snips_intents:test", labels=order).labels == order
    with pytest.raises(DataError, match="a classification dataset, not generation"):
        load_dataset("snips_intents:test", kind="generation")


# ----------------------------------------------------------------------------- template precedence


def test_template_precedence(workspace):
    root, _ = workspace
    stored = ExampleIndex.load(root / "indexes" / "stored").template
    assert ExampleIndex.load(root / "indexes" / "plain").template is None
    kind = TaskKind.CLASSIFICATION
    assert resolve_template(kind, given=GIVEN, stored=stored, dataset="rotten_tomatoes:train") == GIVEN
    assert resolve_template(kind, stored=stored, dataset="rotten_tomatoes:train") == STORED
    assert resolve_template(kind, stored=None, dataset="rotten_tomatoes:train") == SENTIMENT_TEMPLATE
    assert resolve_template(kind, stored=None, dataset="my_reviews") == Template.default(kind)
    assert resolve_template(kind) == Template.default(kind)


def test_resolve_loads_what_the_config_names(workspace):
    root, lm_dir = workspace
    parts = resolve(PipelineConfig(index="stored", indexes_dir=str(root / "indexes"), lm=str(lm_dir)))
    assert parts.folder == root / "indexes" / "stored" and parts.template == STORED and parts.soft is None
    assert len(parts.index) == len(ROWS) and parts.embedder.name == parts.index.manifest["embedder"]
    again = resolve(PipelineConfig(index="plain", indexes_dir=str(root / "indexes"), template=GIVEN), lm=parts.lm,
                    index=parts.index)
    assert again.lm is parts.lm and again.index is parts.index and again.template == GIVEN
    assert not parts.lm.compiled  # compile is asked for, never the default
    compiled = resolve(PipelineConfig(index="plain", indexes_dir=str(root / "indexes"), compile=True), lm=parts.lm)
    assert compiled.lm is parts.lm and parts.lm.compiled  # (torch.compile works at the first forward)


def test_config_file_mistakes_are_one_line(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="c.json:1"):
        PipelineConfig.load(bad)
    bad.write_text(json.dumps({"index": "x", "kk": 1}))
    with pytest.raises(ConfigError, match="unknown pipeline config fields"):
        PipelineConfig.load(bad)
    bad.write_text(json.dumps({"k": 1}))
    with pytest.raises(ConfigError, match="index"):
        PipelineConfig.load(bad)


# ----------------------------------------------------------------------------- engine cache


def test_engine_cache_loads_once_and_shares_parts(workspace):
    """One engine per spec: configs that differ only in query options (k here) share it, and
    the options travel with each call; another spec (an index) is another engine over the same LM."""
    root, lm_dir = workspace
    loaded = []
    cache = EngineCache(size=2, on_load=loaded.append)
    cfg = PipelineConfig(index="plain", indexes_dir=str(root / "indexes"), lm=str(lm_dir), k=2)
    first = cache.get(cfg)
    assert cache.get(PipelineConfig(**cfg.to_dict())) is first  # equal config: the same engine
    assert cache.get(cfg.replace(k=1, method="mmr")) is first  # other query options: still the same engine
    assert cache.get(cfg.spec) is first and first.spec == cfg.spec
    assert loaded == [first]  # on_load: each engine the cache loads, once
    other = cache.get(PipelineConfig(index="plain", indexes_dir=str(root / "indexes"), lm=str(lm_dir),
                                     template={"input_format": "{input} =", "output_format": " {output}"}))
    assert other is not first and other.lm is first.lm and other.index is first.index  # loaded once
    third = cache.get(PipelineConfig(index="stored", indexes_dir=str(root / "indexes"), lm=str(lm_dir)))
    assert third.lm is first.lm and third.index is not first.index  # another folder: its own index
    assert len(cache) == 2 and cache.get(cfg) is not first  # the least recently used was dropped
    assert loaded == [first, other, third, cache.get(cfg)]
    assert get_engine(first) is first
    [p2], [p1] = first.classify(["a great film"], cfg.options), first.classify(["a great film"], k=1)
    assert len(p2.demos) == 2 and len(p1.demos) == 1


def test_engine_cache_reloads_a_rebuilt_index(workspace, tmp_path):
    _, lm_dir = workspace
    ds = Dataset("d", TaskKind.CLASSIFICATION, make_records(ROWS), ("negative", "positive"))
    ExampleIndex.build(ds, get_embedder("hashing:64")).save(tmp_path / "idx")
    cache = EngineCache()
    cfg = PipelineConfig(index=str(tmp_path / "idx"), lm=str(lm_dir))
    first = cache.get(cfg)
    bigger = Dataset("d", TaskKind.CLASSIFICATION, make_records(ROWS + [("fine film", "positive")]),
                     ("negative", "positive"))
    ExampleIndex.build(bigger, get_embedder("hashing:64")).save(tmp_path / "idx", replace=True)
    second = cache.get(cfg)
    assert second is not first and len(second.index) == len(ROWS) + 1 and second.lm is first.lm


def test_engine_cache_with_one_lm_and_given_parts(workspace):
    """EngineCache(lm=...) gives every engine that LM (its configs' lm names only key it); parts
    passed to get() build a new engine (a service's loaded index and shared embedder)."""
    from conftest import make_tiny_lm

    root, _ = workspace
    lm = make_tiny_lm(make_tiny_tokenizer())
    cache = EngineCache(size=4, lm=lm)
    cfg = PipelineConfig(index="plain", indexes_dir=str(root / "indexes"), lm="not-loaded-by-name", k=2)
    index = ExampleIndex.load(root / "indexes" / "plain")
    embedder = get_embedder("hashing:64")
    engine = cache.get(cfg, index=index, embedder=embedder)
    assert engine.lm is lm and engine.index is index and engine.embedder is embedder
    assert cache.get(cfg) is engine
    other = cache.get(PipelineConfig(index="stored", indexes_dir=str(root / "indexes"), lm="x"))
    assert other.lm is lm and other.index is not index


def test_api_query_functions_take_an_engine_or_a_config(workspace):
    """A config's own options answer its query; a loaded engine answers with its defaults (a
    directly loaded engine's are its config's; the shared cache's engines have QueryOptions())."""
    from icl_engine.apps import queries
    from icl_engine.core.engines import ENGINES
    from icl_engine.core.pipeline import Engine

    root, lm_dir = workspace
    cfg = PipelineConfig(index="plain", indexes_dir=str(root / "indexes"), lm=str(lm_dir), k=2)
    ENGINES.clear()
    by_config = queries.classify(cfg, "a great film")
    engine = get_engine(cfg)  # the one queries.classify loaded, from the default cache
    assert len(ENGINES) == 1 and get_engine(PipelineConfig.from_dict(cfg.to_dict())) is engine
    assert len(by_config["demos"]) == 2 and engine.defaults.k == 8
    assert queries.classify(Engine.load(cfg), "a great film") == by_config
    ENGINES.clear()
