"""`kind: lm_eval` end to end: a local task YAML scored through our Evaluator on the in-memory model equals
`lm_eval.simple_evaluate` run directly on the same model and docs, for multiple_choice and generate_until, with
few-shot examples, and for a group YAML (lm-eval's own aggregation); and lm-eval prints nothing per candidate."""

from __future__ import annotations

import json
import logging
import random

import pytest

from evomerge.evaluate.evaluator import Evaluator
from evomerge.evaluate.spec import TaskSpec
from evomerge.models.tiny import char_tokenizer, random_model, tiny_config

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "="]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


GROUP_YAML = """group: {name}
task:
  - tiny_mc
  - tiny_mc_small
aggregate_metric_list:
  - metric: acc
    weight_by_size: {weighted}
  - metric: acc_norm
    weight_by_size: {weighted}
"""


def _mc_rows(rng, n):
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        ch = [str(a + b + k) for k in rng.sample(range(-2, 3), 3)] + ["ab" * (i % 3 + 1)]
        rows.append({"question": f"{a}+{b}=", "choices": ch, "answer": i % 4})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval_local")
    rng = random.Random(1)
    _write_jsonl(d / "mc.jsonl", _mc_rows(rng, 30))
    tok = char_tokenizer()
    model = random_model(tiny_config("llama", vocab_size=len(tok)), seed=3)
    # gold answers: half are what the model itself generates (greedy, until "\n" / "="), so exact_match is
    # neither 0 nor 1 and a wrong doc subset would show
    prompts = [f"{rng.randint(10, 99)}-{rng.randint(1, 9)}:" for _ in range(16)]
    golds = []
    for i, p in enumerate(prompts):
        out = model.generate(**tok(p, return_tensors="pt"), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(p):], skip_special_tokens=True).split("\n")[0].split("=")[0]
        golds.append(text if i % 2 == 0 else "zz")
    with open(d / "gen.jsonl", "w") as f:
        for p, g in zip(prompts, golds):
            f.write(json.dumps({"prompt": p, "answer": g}) + "\n")
    (d / "mc.yaml").write_text(MC_YAML.format(path=d / "mc.jsonl"))
    (d / "gen.yaml").write_text(GEN_YAML.format(path=d / "gen.jsonl"))
    # a second, smaller task (a group's sizes differ: micro != macro), and one with a dev split for few-shot
    _write_jsonl(d / "mc_small.jsonl", _mc_rows(rng, 10))
    (d / "mc_small.yaml").write_text(MC_YAML.format(path=d / "mc_small.jsonl").replace("tiny_mc", "tiny_mc_small"))
    _write_jsonl(d / "mc_dev.jsonl", _mc_rows(rng, 6))
    (d / "mc_fs.yaml").write_text(MC_YAML.format(path=d / "mc.jsonl").replace("tiny_mc", "tiny_mc_fs")
                                  .replace("test_split: test", "test_split: test\nfewshot_split: dev")
                                  .replace("    test:", f"    dev: {d / 'mc_dev.jsonl'}\n    test:"))
    for name, weighted in (("tiny_macro", "false"), ("tiny_micro", "true")):  # group YAMLs: no task name
        (d / f"{name}.yaml").write_text(GROUP_YAML.format(name=name, weighted=weighted))
    return d, model, tok


def _simple_evaluate(model, tok, d, name, samples, **kw):
    """lm-eval run the plain way on the same in-memory model and docs."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    tm = TaskManager(include_path=str(d), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, samples=samples, bootstrap_iters=0,
                                   log_samples=True, **kw)


def _direct(model, tok, d, name, ids, **kw):
    out = _simple_evaluate(model, tok, d, name, {name: sorted(ids)}, **kw)
    return out["results"][name], {str(s["doc_id"]): s for s in out["samples"][name]}


def _same_resps(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if isinstance(b, (tuple, list)):  # (loglikelihood, is_greedy)
            assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1] == b[1]
        else:
            assert a == b


@pytest.mark.parametrize("yaml_name,task,metrics", [("mc.yaml", "tiny_mc", ("acc", "acc_norm")),
                                                    ("gen.yaml", "tiny_gen", ("exact_match",))])
def test_local_yaml_equals_simple_evaluate(setup, yaml_name, task, metrics, monkeypatch):
    d, model, tok = setup
    spec = TaskSpec(name="t", kind="lm_eval", lm_eval_yaml=str(d / yaml_name), n_search=8, n_heldout=6, seed=2,
                    metric=metrics[0])
    search = Evaluator([spec], tok, split="search")
    held = Evaluator([spec], tok, split="heldout")
    s_ids, h_ids = search.split_ids()["t"], held.split_ids()["t"]
    assert len(s_ids) == 8 and len(h_ids) == 6 and not set(s_ids) & set(h_ids)

    # the task was built once, at construction: scoring must not load or index anything again
    from lm_eval.tasks.manager import TaskManager

    def no_rebuild(*a, **k):
        raise AssertionError("lm-eval task rebuilt per evaluate() call")

    with monkeypatch.context() as m:
        m.setattr(TaskManager, "load", no_rebuild)
        m.setattr(TaskManager, "__init__", no_rebuild)
        r1 = search.evaluate(model, per_item=True)
        r2 = search.evaluate(model, per_item=True)
        rh = held.evaluate(model, per_item=True)
    assert r1.metrics == r2.metrics and r1.per_item == r2.per_item  # repeatable per candidate

    for res, ids in ((r1, s_ids), (rh, h_ids)):
        ref, samples = _direct(model, tok, d, task, [int(i) for i in ids])
        assert set(res.per_item["t"]) == set(ids) == set(samples)
        for metric in metrics:
            assert res.metrics["t"][metric] == pytest.approx(ref[f"{metric},none"], abs=1e-12)
        for i in ids:  # the same per-doc model outputs (log-likelihoods up to batching noise / generated strings)
            _same_resps(res.per_item["t"][i]["resps"], samples[i]["filtered_resps"])
        assert res.fitness == pytest.approx(ref[f"{metrics[0]},none"])
    if task == "tiny_gen":  # a non-trivial metric: some docs right, some wrong
        assert 0 < r1.metrics["t"]["exact_match"] < 1 or 0 < rh.metrics["t"]["exact_match"] < 1


def test_yaml_errors(setup, tmp_path):
    from evomerge.errors import ConfigError

    d, _, tok = setup
    with pytest.raises(ConfigError, match="not found"):
        Evaluator([TaskSpec(name="t", kind="lm_eval", lm_eval_yaml=str(tmp_path / "nope.yaml"))], tok)
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match="no `task:` name"):
        Evaluator([TaskSpec(name="t", kind="lm_eval", lm_eval_yaml=str(tmp_path / "bad.yaml"))], tok)


def test_fewshot_equals_simple_evaluate(setup):
    """num_fewshot on a task with a dev split: lm-eval's sampler, seeded as simple_evaluate seeds it, per call."""
    d, model, tok = setup
    spec = TaskSpec(name="t", kind="lm_eval", lm_eval_yaml=str(d / "mc_fs.yaml"), n_search=10, seed=4, num_fewshot=3)
    ev = Evaluator([spec], tok, split="search")
    ids = ev.split_ids()["t"]
    r1, r2 = ev.evaluate(model, per_item=True), ev.evaluate(model, per_item=True)
    assert r1.per_item == r2.per_item
    ref, samples = _direct(model, tok, d, "tiny_mc_fs", [int(i) for i in ids], num_fewshot=3)
    zero = Evaluator([spec.model_copy(update={"num_fewshot": 0})], tok, split="search").evaluate(model, per_item=True)
    for i in ids:
        _same_resps(r1.per_item["t"][i]["resps"], samples[i]["filtered_resps"])
        assert r1.per_item["t"][i]["resps"] != zero.per_item["t"][i]["resps"]  # the shots are really there
    assert r1.metrics["t"]["acc"] == pytest.approx(ref["acc,none"], abs=1e-12)


@pytest.mark.parametrize("group,weighted", [("tiny_macro", False), ("tiny_micro", True)])
def test_group_yaml_scores_subtasks_and_aggregates_as_lm_eval(setup, group, weighted):
    """A group YAML (`group:` + `task:` list, no task name): every subtask scored on its stratified share of the
    split, the group's metrics as lm-eval aggregates them (weight_by_size: micro; else the mean of subtasks)."""
    d, model, tok = setup
    spec = TaskSpec(name="g", kind="lm_eval", lm_eval_yaml=str(d / f"{group}.yaml"), n_search=16, seed=1)
    ev = Evaluator([spec], tok, split="search")
    res = ev.evaluate(model, per_item=True)
    ids = ev.split_ids()["g"]
    tasks = ("tiny_mc", "tiny_mc_small")
    samples = {t: sorted(int(i.split("/")[1]) for i in ids if i.split("/")[0] == t) for t in tasks}
    assert [len(samples[t]) for t in tasks] == [12, 4] and set(res.per_item["g"]) == set(ids)
    out = _simple_evaluate(model, tok, d, group, samples)
    m = res.metrics["g"]
    for metric in ("acc", "acc_norm"):
        per_task = [out["results"][t][f"{metric},none"] for t in tasks]
        micro = (per_task[0] * 12 + per_task[1] * 4) / 16
        macro = sum(per_task) / 2
        assert abs(micro - macro) > 1e-3  # the two rules really differ here
        assert m[metric] == pytest.approx(out["results"][group][f"{metric},none"], abs=1e-12)
        assert m[metric] == pytest.approx(micro if weighted else macro, abs=1e-12)
        for t, v in zip(tasks, per_task):
            assert m[f"{t}/{metric}"] == pytest.approx(v, abs=1e-12)
    for t in tasks:
        for s in out["samples"][t]:
            _same_resps(res.per_item["g"][f"{t}/{s['doc_id']}"]["resps"], s["filtered_resps"])


def test_lm_eval_prints_nothing_per_candidate(setup, capfd):
    """Building the task and scoring candidates (each a new model object: a new HFLM) emits no lm-eval log record
    and writes nothing to stdout / stderr (no progress bars), even with lm-eval's loggers at DEBUG."""
    d, model, tok = setup
    records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.DEBUG)
    catch.emit = records.append  # type: ignore[method-assign]
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.addHandler(catch)
    lm_logger.setLevel(logging.DEBUG)
    try:
        capfd.readouterr()
        spec = TaskSpec(name="t", kind="lm_eval", lm_eval_yaml=str(d / "mc_fs.yaml"), n_search=6, num_fewshot=2)
        ev = Evaluator([spec], tok, split="search")
        other = random_model(tiny_config("llama", vocab_size=len(tok)), seed=5)
        for candidate in (model, other, model):
            ev.evaluate(candidate)
        out, err = capfd.readouterr()
    finally:
        lm_logger.removeHandler(catch)
        lm_logger.setLevel(level)
    assert (out, err) == ("", "")
    assert [r.getMessage() for r in records] == []
    assert lm_logger.level == level  # restored
