"""Few-shot KMMLU prompts are lm-eval's, document for document (no model needed): the contexts our `kmmlu` task
builds from a local HAERAE-HUB/KMMLU copy equal the requests lm-eval's own kmmlu YAMLs build on the same files."""

from __future__ import annotations

import random

import pytest

from evomerge.errors import DataError
from evomerge.evaluate.data import MCQItem, load_items
from evomerge.evaluate.prompts import lm_eval_shots
from evomerge.evaluate.spec import TaskSpec
from evomerge.evaluate.tasks import _contexts

from .conftest import SUBJECTS


def _lm_eval_requests(tasks_dir, shots: int, seed: int = 1234) -> dict[str, list[tuple[str, str]]]:
    """item id -> [(context, continuation)] of lm-eval's requests, built as simple_evaluate builds them."""
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(tasks_dir), include_defaults=False).load(["kmmlu_stem", "kmmlu_humss"])
    subject_of = {task: subject for subject, (task, _) in SUBJECTS.items()}
    out: dict[str, list[tuple[str, str]]] = {}
    for name, task in loaded["tasks"].items():
        task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(seed=seed)
        task.build_all_requests(rank=0, world_size=1)
        for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            out.setdefault(f"{subject_of[name]}/test/{inst.doc_id}", []).append(inst.args)
    return out


def _ours(root, **kw) -> dict[str, list[tuple[str, str]]]:
    spec = TaskSpec(name="k", kind="kmmlu", path=str(root), **kw)
    items = load_items("kmmlu", path=str(root))
    ctxs, delim, _ = _contexts(spec, items, None, None, items)
    return {it.id: [(c, delim + letter) for letter in it.choices] for it, c in zip(items, ctxs)}


@pytest.mark.parametrize("shots", [0, 1, 5])
def test_kmmlu_contexts_equal_lm_eval_requests(kmmlu_local, shots):
    root, tasks_dir = kmmlu_local
    theirs = _lm_eval_requests(tasks_dir, shots)
    ours = _ours(root, num_fewshot=shots)
    assert len(ours) == 28 and ours == theirs
    if shots == 5:  # each subject has 5 dev items: every prompt holds all of them, in lm-eval's drawn order
        assert len({c[0][0].split("\n\n")[0] for c in ours.values()}) > 1
        file_order = _ours(root, num_fewshot=shots, fewshot_order="file")
        assert sum(file_order[i] != theirs[i] for i in theirs) >= 20  # the option really is another selection


def test_seed_is_lm_eval_fewshot_random_seed(kmmlu_local):
    root, tasks_dir = kmmlu_local
    assert _ours(root, num_fewshot=2, fewshot_seed=7) == _lm_eval_requests(tasks_dir, 2, seed=7)
    assert _ours(root, num_fewshot=2, fewshot_seed=7) != _ours(root, num_fewshot=2)


def _docs(n, cat="c"):
    return [MCQItem(f"{cat}{i}", f"q{i}", ("A", "B"), i % 2, cat) for i in range(n)]


@pytest.mark.parametrize("same_split", [False, True])
def test_shots_follow_lm_eval_context_sampler(same_split):
    """Against lm-eval's ContextSampler itself: one seeded stream per subject, advanced item by item in file
    order; with the test split as the pool, the item itself is dropped from its draw."""
    from lm_eval.api.samplers import ContextSampler

    items = _docs(9, "x") + _docs(7, "y")
    rng = random.Random(0)
    rng.shuffle(items)  # categories interleaved: each keeps its own stream
    pool = items if same_split else _docs(6, "x") + _docs(5, "y")
    ours = lm_eval_shots(items, pool, 3, seed=1234, same_split=same_split)
    samplers = {c: ContextSampler([p for p in pool if p.category == c], rnd=None).set_rnd(1234) for c in "xy"}
    for it in items:
        theirs = samplers[it.category].sample(3, eval_doc=it if same_split else None)
        assert [s.id for s in ours[it.id]] == [s.id for s in theirs]
        assert it.id not in [s.id for s in ours[it.id]] or not same_split


def test_too_few_dev_items_of_the_subject(kmmlu_local, tmp_path):
    root, _ = kmmlu_local
    with pytest.raises(DataError, match="num_fewshot=6 but subject/category 'Biology' has 5 .*fewshot_order: file"):
        _ours(root, num_fewshot=6)
    assert len(next(iter(_ours(root, num_fewshot=6, fewshot_order="file").values()))[0][0].split("\n\n")) == 7
