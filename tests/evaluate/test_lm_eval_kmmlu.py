"""Our `kmmlu` task on a local copy of HAERAE-HUB/KMMLU == lm-eval's own kmmlu task YAMLs (as shipped, only pointed at
the local files) run by `lm_eval.simple_evaluate` on the same in-memory SmolLM2-135M-Instruct: the same per-choice
log-likelihoods at 0 and 5 shots (so the same dev shots, in the same order, in the same prompt format), and a
`kind: lm_eval` task given lm-eval's kmmlu group YAML (no task name of its own) scores every subtask and reports the
group as lm-eval does. The prompts of all four local subjects are compared string for string, without a model, in
test_lm_eval_fewshot.py; here the model runs on the STEM subjects (0-shot) and Math (5-shot) only, for time."""

from __future__ import annotations

import pytest

from evomerge.evaluate.evaluator import Evaluator
from evomerge.evaluate.spec import TaskSpec

from .conftest import SUBJECTS, compare_logliks

pytestmark = pytest.mark.slow

RUNS = {0: (["kmmlu_stem"], ["Math", "Biology"]), 5: (["kmmlu_math"], ["Math"])}  # shots -> (lm-eval tasks, subjects)


@pytest.fixture(scope="module")
def lm_eval_runs(smol, kmmlu_local):
    """simple_evaluate as a user runs it (fewshot_random_seed 1234), one HFLM over the loaded model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = smol
    _, tasks_dir = kmmlu_local
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # the local YAMLs only: fast
    return {shots: lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, num_fewshot=shots,
                                           log_samples=True, bootstrap_iters=0)
            for shots, (tasks, _) in RUNS.items()}


def _their_logliks(out) -> dict[str, list[float]]:
    subject_of = {task: subject for subject, (task, _) in SUBJECTS.items()}
    return {f"{subject_of[task]}/test/{s['doc_id']}": [float(r[0]) for r in s["filtered_resps"]]
            for task, samples in out["samples"].items() for s in samples}


@pytest.mark.parametrize("shots", sorted(RUNS))
def test_kmmlu_folder_matches_lm_eval_kmmlu_yamls(smol, kmmlu_local, lm_eval_runs, shots):
    model, tok = smol
    root, _ = kmmlu_local
    out = lm_eval_runs[shots]
    spec = TaskSpec(name="k", kind="kmmlu", path=str(root), subjects=RUNS[shots][1], num_fewshot=shots)
    res = Evaluator([spec], tok, split="all", batch_tokens=2048).evaluate(model, per_item=True)
    theirs = _their_logliks(out)
    assert len(theirs) == 7 * len(RUNS[shots][1])
    worst = compare_logliks(res.per_item["k"], theirs)
    print(f"{shots}-shot: max relative difference {worst:.2e}")
    n = {t: out["results"][t]["sample_len"] for t in out["results"] if t in out["samples"]}
    micro = sum(out["results"][t]["acc,none"] * n[t] for t in n) / sum(n.values())
    assert res.metrics["k"]["acc"] == pytest.approx(micro, abs=1e-12)


def test_lm_eval_kind_runs_kmmlu_group_yaml(smol, kmmlu_local, lm_eval_runs):
    """`lm_eval_yaml:` lm-eval's `_kmmlu_stem.yaml` (`group: kmmlu_stem`, `task: [kmmlu_stem_tasks]`)."""
    model, tok = smol
    _, tasks_dir = kmmlu_local
    out = lm_eval_runs[0]
    spec = TaskSpec(name="g", kind="lm_eval", lm_eval_yaml=str(tasks_dir / "_kmmlu_stem.yaml"))
    res = Evaluator([spec], tok, split="all").evaluate(model, per_item=True)
    m = res.metrics["g"]
    assert m["acc"] == pytest.approx(out["results"]["kmmlu_stem"]["acc,none"], abs=1e-12)
    ours = {}
    for task in ("kmmlu_math", "kmmlu_biology"):
        assert m[f"{task}/acc"] == pytest.approx(out["results"][task]["acc,none"], abs=1e-12)
        ours.update({f"{task}/{i}": {"loglik": [r[0] for r in res.per_item["g"][f"{task}/{i}"]["resps"]]}
                     for i in range(7)})
    theirs = {f"{task}/{s['doc_id']}": [float(r[0]) for r in s["filtered_resps"]]
              for task, samples in out["samples"].items() for s in samples}
    compare_logliks(ours, theirs)
