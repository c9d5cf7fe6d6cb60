"""Data parsing, subsets and bad-input errors (no model needed)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from evomerge.errors import ConfigError, DataError
from evomerge.evaluate.data import load_items
from evomerge.evaluate.generate import cut_at_stop, extract_answer, normalize_answer
from evomerge.evaluate.prompts import kmmlu_prompt
from evomerge.evaluate.spec import TaskSpec
from evomerge.evaluate.splits import make_splits
from evomerge.evaluate.tasks import select_items

DATA = Path(__file__).resolve().parents[2] / "evomerge" / "data" / "tasks"


def test_shipped_files_parse():
    k = load_items("kmmlu", path=str(DATA / "kmmlu_ko_demo.csv"))
    assert len(k) == 40 and Counter(i.category for i in k) == {c: 10 for c in
                                                               ["Korean-History", "Math", "Biology", "Economics"]}
    assert Counter(i.answer for i in k).keys() == {0, 1, 2, 3}
    assert len(load_items("kmmlu", path=str(DATA / "kmmlu_ko_dev.csv"))) == 8
    assert len(load_items("mcq", path=str(DATA / "mcq_demo.jsonl"))) == 20
    g = load_items("generation", path=str(DATA / "math_mgsm_style.jsonl"))
    assert len(g) == 24 and all(normalize_answer(i.answer) == i.answer for i in g)


def test_kmmlu_prompt_is_lm_eval_template():
    item = load_items("kmmlu", path=str(DATA / "kmmlu_ko_demo.csv"))[0]
    assert kmmlu_prompt(item) == "조선을 건국한 인물은 누구인가?\nA. 왕건\nB. 이성계\nC. 세종\nD. 정도전\n정답\uff1a"


def test_csv_and_jsonl_agree(tmp_path):
    rows = [{"question": "q1 ", "A": "a", "B": "b", "C": "c", "D": "d", "answer": 3, "Category": "x"}]
    (tmp_path / "k.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "k.csv").write_text("question,A,B,C,D,answer,Category\nq1 ,a,b,c,d,3,x\n")
    a = load_items("kmmlu", path=str(tmp_path / "k.jsonl"))
    b = load_items("kmmlu", path=str(tmp_path / "k.csv"))
    assert a == b and a[0].answer == 2 and a[0].id == "0"


def _items(n_per_cat=(10, 6, 4)):
    from evomerge.evaluate.data import GenItem

    return [GenItem(f"{c}{i}", "p", "1", c) for c, n in zip("xyz", n_per_cat) for i in range(n)]


def test_splits_disjoint_stratified_seeded():
    items = _items()
    s = make_splits(items, seed=1, per_category=2)
    assert Counter(i.category for i in s["search"]) == {"x": 2, "y": 2, "z": 2}
    assert Counter(i.category for i in s["heldout"]) == {"x": 2, "y": 2, "z": 2}
    assert not {i.id for i in s["search"]} & {i.id for i in s["heldout"]}
    assert [i.id for i in make_splits(items, seed=1, per_category=2)["search"]] == [i.id for i in s["search"]]
    assert [i.id for i in make_splits(items, seed=2, per_category=2)["search"]] != [i.id for i in s["search"]]

    t = make_splits(items, seed=0, n_search=10, n_heldout=5)
    assert len(t["search"]) == 10 and len(t["heldout"]) == 5
    assert Counter(i.category for i in t["search"]) == {"x": 5, "y": 3, "z": 2}  # proportional
    assert not {i.id for i in t["search"]} & {i.id for i in t["heldout"]}
    u = make_splits(items, seed=0, n_search=8)
    assert len(u["search"]) == 8 and len(u["heldout"]) == 12  # the rest is held out
    v = make_splits(items, seed=0, n_heldout=5)
    assert len(v["search"]) == 15 and len(v["heldout"]) == 5


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_missing_column_names_file_and_key(tmp_path):
    p = _write(tmp_path, "bad.csv", "question,A,B,C,answer\nq,a,b,c,1\n")
    with pytest.raises(DataError) as e:
        load_items("kmmlu", path=p)
    assert "bad.csv" in str(e.value) and "'D'" in str(e.value)


def test_answer_out_of_range(tmp_path):
    p = _write(tmp_path, "oor.csv", "question,A,B,C,D,answer\nq,a,b,c,d,5\n")
    with pytest.raises(DataError) as e:
        load_items("kmmlu", path=p)
    assert "oor.csv" in str(e.value) and "key 'answer'" in str(e.value) and "1, 2, 3, 4" in str(e.value)
    p = _write(tmp_path, "oor.jsonl", json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(DataError, match="oor.jsonl.*key 'answer'"):
        load_items("mcq", path=p)


def test_empty_split_and_empty_file(tmp_path):
    spec = TaskSpec(name="t", kind="generation", path="x.jsonl")
    with pytest.raises(DataError, match="x.jsonl.*'heldout' split of task 't' is empty"):
        select_items(spec, _items(), "heldout", "x.jsonl")
    p = _write(tmp_path, "empty.jsonl", "\n")
    with pytest.raises(DataError, match="empty.jsonl.*no items"):
        load_items("generation", path=p)


def test_subset_larger_than_data():
    with pytest.raises(DataError, match="src.csv: key 'n_search': n_search=50 is larger than the data"):
        make_splits(_items(), n_search=50, source="src.csv")
    with pytest.raises(DataError, match="key 'per_category'.*'z' has only 4"):
        make_splits(_items(), per_category=5, source="src.csv")
    with pytest.raises(DataError, match="key 'n_heldout'"):
        make_splits(_items(), n_search=15, n_heldout=6, source="src.csv")


def test_missing_file_and_offline_dataset(tmp_path):
    with pytest.raises(DataError, match="nope.csv.*not found"):
        load_items("kmmlu", path=str(tmp_path / "nope.csv"))
    # tests run with HF_DATASETS_OFFLINE=1: the error names the data set and the local-file way out
    with pytest.raises(DataError) as e:
        load_items("kmmlu", dataset="HAERAE-HUB/KMMLU", subjects=["Math"], split="test")
    assert "HAERAE-HUB/KMMLU" in str(e.value) and "`path:`" in str(e.value)


def test_spec_validation():
    with pytest.raises(ValidationError):
        TaskSpec(name="t", kind="kmmlu")  # no data
    with pytest.raises(ValidationError):
        TaskSpec(name="t", kind="kmmlu", path="a.csv", bogus=1)  # extra="forbid"
    with pytest.raises(ValidationError):
        TaskSpec(name="t", kind="custom", function="no_colon")
    assert TaskSpec(name="t", kind="generation", path="a").objective_metric == "exact_match"
    assert TaskSpec(name="t", kind="kmmlu", path="a").objective_metric == "acc"


def test_answer_extraction():
    assert extract_answer("12 + 9 = 21 apples", numeric=True) == "21"
    assert normalize_answer("1,250.0") == "1250" and normalize_answer("$4.50") == "4.5"
    assert normalize_answer(" -6 ") == "-6" and normalize_answer(" abc ") == "abc"
    assert extract_answer("The answer is 42.", regex=r"The answer is (\-?[0-9\.\,]+)") == "42."
    assert normalize_answer(extract_answer("The answer is 42.", regex=r"The answer is (\-?[0-9\.\,]+)")) == "42"
    assert extract_answer("nothing here", regex=r"answer is (\d+)") == ""
    assert cut_at_stop("7\nQuestion: x", ["\n", "Question:"]) == "7"


def test_unknown_lm_eval_task():
    from evomerge.evaluate.tasks import LmEvalTask

    spec = TaskSpec(name="x", kind="lm_eval", lm_eval_task="kmmlu_no_such_subject")
    with pytest.raises(ConfigError) as e:
        LmEvalTask(spec, tokenizer=None, split="all")
    assert "unknown lm-eval task 'kmmlu_no_such_subject'" in str(e.value) and "lm_eval_task" in str(e.value)


def test_kmmlu_folder_layout(kmmlu_local):
    """A local HAERAE-HUB/KMMLU copy: every subject (or those asked), ids as with `dataset:`, the subject kept."""
    root, _ = kmmlu_local
    items = load_items("kmmlu", path=str(root))
    assert len(items) == 28 and items[0].id == "Biology/test/0" and items[0].subject == "Biology"
    assert {i.category for i in items} == {"STEM", "HUMSS"}  # the file's Category column, not the subject
    assert load_items("kmmlu", path=str(root / "data"), subjects=["Math"], split="dev")[4].id == "Math/dev/4"
    with pytest.raises(DataError, match="no file for subject 'Physics'.*allowed: Biology, Economics"):
        load_items("kmmlu", path=str(root), subjects=["Physics"])
    with pytest.raises(DataError, match="kind kmmlu only"):
        load_items("mcq", path=str(root))
    TaskSpec(name="t", kind="kmmlu", path=str(root), num_fewshot=5)  # the folder's dev files: no fewshot_path
    with pytest.raises(ValidationError, match="fewshot_path"):
        TaskSpec(name="t", kind="kmmlu", path="k.csv", num_fewshot=5)
