"""Fixed files for a split (`heldout_path`, `selection_path`): the split is every item of its file, the other
splits still come from `path`, and a question in two splits is refused naming the file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.errors import ConfigError, DataError, EvomergeError
from evomerge.evaluate.evaluator import Evaluator
from evomerge.evaluate.spec import TaskSpec
from evomerge.models.tiny import char_tokenizer


def _gen(path: Path, start: int, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                            for i in range(start, start + n)))
    return path


@pytest.fixture()
def files(tmp_path):
    return {"main": _gen(tmp_path / "main.jsonl", 0, 30), "report": _gen(tmp_path / "report.jsonl", 100, 7),
            "pick": _gen(tmp_path / "pick.jsonl", 200, 5), "leaky": _gen(tmp_path / "leaky.jsonl", 25, 10)}


def _prompts(spec: TaskSpec, split: str) -> set[str]:
    ev = Evaluator([spec], char_tokenizer(), split=split)  # type: ignore[arg-type]
    return {it.prompt for it in ev.tasks[spec.name].items}  # type: ignore[attr-defined]


def test_fixed_files_are_the_splits(files):
    spec = TaskSpec(name="g", kind="generation", path=str(files["main"]), n_search=12, n_selection=6,
                    heldout_path=str(files["report"]), continuous=0.0)
    search, selection, heldout = (_prompts(spec, s) for s in ("search", "selection", "heldout"))
    assert heldout == {f"{i}+1=" for i in range(100, 107)}  # every item of the file
    assert len(search) == 12 and len(selection) == 6 and not search & selection
    assert search | selection <= {f"{i}+1=" for i in range(30)}
    both = TaskSpec(name="g", kind="generation", path=str(files["main"]), n_search=12,
                    heldout_path=str(files["report"]), selection_path=str(files["pick"]), continuous=0.0)
    assert _prompts(both, "selection") == {f"{i}+1=" for i in range(200, 205)}


def test_a_question_in_two_splits_is_refused(files):
    spec = TaskSpec(name="g", kind="generation", path=str(files["main"]), heldout_path=str(files["leaky"]))
    with pytest.raises(DataError) as err:  # items 25..29 of leaky.jsonl are in main.jsonl (all of it searched)
        _prompts(spec, "search")
    assert "5 item(s) of the heldout file are also in the search split" in str(err.value)
    assert str(files["leaky"]) in str(err.value) and "heldout_path" in str(err.value)


@pytest.mark.parametrize("fields, key", [({"heldout_path": "r.jsonl", "n_heldout": 3}, "heldout_path"),
                                         ({"selection_path": "p.jsonl", "n_selection": 3}, "selection_path")])
def test_a_file_and_a_count_for_one_split_name_the_key(fields, key, tmp_path):
    from evomerge.config import parse_search_space

    task = {"name": "g", "kind": "generation", "path": "main.jsonl", "n_search": 5} | fields
    text = yaml.safe_dump({"name": "t", "models": {"base": "b"}, "merge_method": "linear", "tasks": [task]})
    with pytest.raises(ConfigError) as err:
        parse_search_space(text, source="space.yaml")
    assert f"key 'tasks.0.{key}'" in str(err.value)


def test_validate_counts_the_file_and_names_a_missing_one(files, tmp_path):
    from evomerge.models.tiny import make_family
    from evomerge.validate import check_space, validate_space

    fam = make_family(tmp_path / "fam", names=("base", "a"))
    task = {"name": "g", "kind": "generation", "path": str(files["main"]), "n_search": 10,
            "heldout_path": str(files["report"])}
    data = {"name": "t", "models": {k: str(v) for k, v in fam.items()}, "base_model": "base",
            "merge_method": "ties", "tasks": [task]}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    report = check_space(space)
    assert [(t.n_search, t.n_heldout) for t in report.tasks] == [(10, 7)]
    task["heldout_path"] = str(tmp_path / "nope.jsonl")
    space.write_text(yaml.safe_dump(data))
    with pytest.raises(EvomergeError) as err:
        validate_space(space)
    assert "key 'tasks.0.heldout_path'" in str(err.value) and "nope.jsonl" in str(err.value)
