import json

import pytest

from icl_engine.core.data import DataError, Dataset, TaskKind, group_references, load_dataset, make_records

from conftest import shared_data


def write(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def test_jsonl_classification_labels_sorted_and_ids_stable(tmp_path):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "ok", "label": "pos"}]
    p = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    d = load_dataset(p)
    assert d.kind is TaskKind.CLASSIFICATION
    assert d.labels == ("neg", "pos")
    # ids are content hashes: reordering the file keeps each record's id
    p2 = write(tmp_path, "e.jsonl", "\n".join(json.dumps(r) for r in reversed(rows)))
    assert {r.id: r for r in load_dataset(p2)} == {r.id: r for r in d}


def test_user_label_order_and_unknown_label(tmp_path):
    p = write(tmp_path, "d.csv", "sentence,target\ngood,pos\nbad,neg\n")
    assert load_dataset(p, labels=["pos", "neg"]).labels == ("pos", "neg")
    with pytest.raises(DataError, match="not in the given label list"):
        load_dataset(p, labels=["pos", "meh"])


def test_generation_inferred_and_split_by_input(tmp_path):
    rows = [{"input": f"in{i % 5}", "output": f"out{i}"} for i in range(20)]
    p = write(tmp_path, "g.jsonl", "\n".join(json.dumps(r) for r in rows))
    d = load_dataset(p)
    assert d.kind is TaskKind.GENERATION and d.labels == ()
    train, test = d.split(0.4, seed=1)
    assert not {r.input for r in train} & {r.input for r in test}
    assert len(train) + len(test) == 20
    assert [len(refs) for _, refs in group_references(d.records)] == [4] * 5


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("a.jsonl", '{"text": "x", "label": "a"}\n{"text": "y"}\n', r"a\.jsonl:2: missing field 'label'"),
        ("b.jsonl", '{"text": "x", "label": "a"}\n{"text": "  ", "label": "b"}\n', r"b\.jsonl:2: field 'text' is empty"),
        ("c.jsonl", b'{"text": "x", "label": "a"}\n{"text": "\xff", "label": "b"}\n', r"c\.jsonl:2: not valid UTF-8"),
        ("d.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", "label": "a"}\n', "only one class"),
        ("e.jsonl", "", "empty"),
        ("f.csv", "text,label\n", "no rows"),
        ("g.jsonl", '{"text": "x", "label": "a"}\nnot json\n', r"g\.jsonl:2: not valid JSON"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, name, content, match):
    p = write(tmp_path, name, content)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(p)
    assert "\n" not in str(e.value)


def test_missing_file_and_field(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl")
    p = write(tmp_path, "d.jsonl", '{"body": "x", "y": "a"}\n')
    with pytest.raises(DataError, match="no text field"):
        load_dataset(p)
    assert load_dataset(write(tmp_path, "e.jsonl", '{"review": "x", "y": "a"}\n{"review": "z", "y": "b"}\n'),
                        text_field="review", label_field="y").labels == ("a", "b")


def test_subsample_and_split_are_seeded():
    d = Dataset("t", TaskKind.CLASSIFICATION, make_records((f"t{i}", "ab"[i % 2]) for i in range(50)), ("a", "b"))
    assert d.subsample(10, seed=3).records == d.subsample(10, seed=3).records
    assert d.subsample(10, seed=3).records != d.subsample(10, seed=4).records
    a, b = d.split(0.2, seed=0)
    assert len(b) == 10 and {r.id for r in a}.isdisjoint(r.id for r in b)


def test_duplicate_pairs_get_distinct_ids():
    recs = make_records([("x", "a"), ("x", "a"), ("y", "a")])
    assert len({r.id for r in recs}) == 3 and recs[1].id == recs[0].id + "-2"


@pytest.mark.slow
def test_builtin_rotten_tomatoes():
    d = load_dataset("rotten_tomatoes")
    assert d.labels == ("negative", "positive") and len(d) > 12000
    train, test = load_dataset("rotten_tomatoes:train"), load_dataset("rotten_tomatoes:test")
    assert len(test) == 1000 and len(train) + len(test) == len(d)
    assert not {r.input for r in train} & {r.input for r in test}
    # a sub-pool loads by the name Dataset.subsample gives it, as the same records
    sub = train.subsample(50, seed=3)
    again = load_dataset(sub.name)
    assert again.name == sub.name == "rotten_tomatoes:train[50@3]" and again.records == sub.records
    assert again.labels == train.labels


def test_shared_files_load():
    d = load_dataset(shared_data("snips_intents.jsonl"))
    assert len(d.labels) == 7 and len(d) == 693
    assert load_dataset(shared_data("e2e_nlg.jsonl")).kind is TaskKind.GENERATION


def test_line_separators_inside_json_strings_are_not_line_breaks(tmp_path):
    # str.splitlines() would split on these; JSON allows them raw inside strings
    texts = ["a\u2028b", "c\x85d", "e\x1cf"]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "label": str(i % 2)}, ensure_ascii=False) for i, t in enumerate(texts)) + "\n",
                 encoding="utf-8")
    assert [r.input for r in load_dataset(p)] == texts


# ----------------------------------------------------------------------------- generation files as users have them


def test_a_list_of_references_is_one_record_per_reference(tmp_path):
    rows = [{"input": "dog, frisbee, catch", "output": ["A dog catches a frisbee.", "The dog caught the frisbee."]},
            {"input": "cat, sofa", "output": "A cat sleeps on the sofa."},  # a plain string still works
            {"input": "dog, frisbee, catch", "output": ["  A dog leaps for a frisbee. "]}]  # the input again, later
    d = load_dataset(write(tmp_path, "cg.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert d.kind is TaskKind.GENERATION and len(d) == 4
    assert [(r.input, r.output) for r in d] == [
        ("dog, frisbee, catch", "A dog catches a frisbee."), ("dog, frisbee, catch", "The dog caught the frisbee."),
        ("cat, sofa", "A cat sleeps on the sofa."), ("dog, frisbee, catch", "A dog leaps for a frisbee.")]
    assert "[" not in "".join(r.output for r in d)  # not the string "['...']"
    assert d.records == make_records((r.input, r.output) for r in d)  # ids stay content hashes
    assert group_references(d.records) == [
        ("dog, frisbee, catch",
         ["A dog catches a frisbee.", "The dog caught the frisbee.", "A dog leaps for a frisbee."]),
        ("cat, sofa", ["A cat sleeps on the sofa."])]
    train, test = d.split(0.5, seed=0)  # all the references of an input on one side
    assert not {r.input for r in train} & {r.input for r in test} and len(train) + len(test) == 4
    # the same through the kind given and other field names
    p = write(tmp_path, "other.jsonl", json.dumps({"concepts": "a b", "targets": ["x", "y"]}))
    g = load_dataset(p, kind="generation", text_field="concepts", label_field="targets")
    assert [(r.input, r.output) for r in g] == [("a b", "x"), ("a b", "y")]


@pytest.mark.parametrize("output,match", [
    ([], r"g\.jsonl:2: field 'output' is an empty list"),
    (["fine", 3], r"g\.jsonl:2: field 'output' holds a number \(3\); a list of references must hold non-empty strings"),
    (["fine", "  "], r"g\.jsonl:2: field 'output' holds an empty string"),
    (["fine", ["nested"]], r"g\.jsonl:2: field 'output' holds a list"),
])
def test_bad_reference_lists_are_one_line_errors(tmp_path, output, match):
    p = write(tmp_path, "g.jsonl", json.dumps({"input": "a", "output": "b"}) + "\n"
              + json.dumps({"input": "c", "output": output}) + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_dataset(p)
    assert "\n" not in str(e.value)


def test_lists_stay_refused_for_classification_and_for_inputs(tmp_path):
    p = write(tmp_path, "c.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": ["x", "y"]}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'label' is a list .*expected a string; a list of "
                                        r"references is read for generation data"):
        load_dataset(p)
    p = write(tmp_path, "k.jsonl", '{"input": "a", "output": ["x"]}\n')
    with pytest.raises(DataError, match="field 'output' is a list"):  # classification asked for
        load_dataset(p, kind="classification")
    p = write(tmp_path, "i.jsonl", '{"input": ["a", "b"], "output": "x"}\n')
    with pytest.raises(DataError, match=r"i\.jsonl:1: field 'input' is a list \(\[.*expected a string$"):
        load_dataset(p)
