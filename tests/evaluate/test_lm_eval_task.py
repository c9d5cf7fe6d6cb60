"""`kind: lm_eval` end to end: a local task YAML scored through our Evaluator on the in-memory model equals
`lm_eval.simple_evaluate` run directly on the same model and docs, for multiple_choice and generate_until."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval_local")
    rng = random.Random(1)
    with open(d / "mc.jsonl", "w") as f:
        for i in range(30):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            ch = [str(a + b + k) for k in rng.sample(range(-2, 3), 3)] + ["ab" * (i % 3 + 1)]
            f.write(json.dumps({"question": f"{a}+{b}=", "choices": ch, "answer": i % 4}) + "\n")
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
    return d, model, tok


def _direct(model, tok, d, name, ids):
    """lm-eval run the plain way on the same in-memory model and docs."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    tm = TaskManager(include_path=str(d), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, samples={name: sorted(ids)},
                                  bootstrap_iters=0, log_samples=True)
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
