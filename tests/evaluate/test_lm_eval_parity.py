"""Our scorer against lm-eval 0.4.x and transformers `generate`, on the real SmolLM2-135M-Instruct (GGUF).

Per-item log-likelihoods agree to float32 rounding, within conftest.PARITY_RTOL = 1e-5 relative (measured here:
about 3e-6, see conftest); a different prompt moves them by far more (typically > 1e-2 relative)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from evomerge.evaluate.evaluator import Evaluator
from evomerge.evaluate.generate import cut_at_stop, extract_answer, normalize_answer, normalize_number
from evomerge.evaluate.spec import TaskSpec

from .conftest import compare_logliks

DATA = Path(__file__).resolve().parents[2] / "evomerge" / "data" / "tasks"

KMMLU_YAML = """task: kmmlu_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n정답："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{answer-1}}}}"
metric_list:
  - metric: acc
"""

MCQ_YAML = """task: mcq_local
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


@pytest.fixture(scope="module")
def lm_eval_run(smol, tmp_path_factory):
    """Both tasks through lm-eval once (per-item log-likelihoods via log_samples)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = smol
    d = tmp_path_factory.mktemp("lmeval_tasks")
    rows = list(csv.DictReader((DATA / "kmmlu_ko_demo.csv").read_text(encoding="utf-8").splitlines()))
    with open(d / "kmmlu.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(r, answer=int(r["answer"])), ensure_ascii=False) + "\n")
    (d / "kmmlu_local.yaml").write_text(KMMLU_YAML.format(path=d / "kmmlu.jsonl"), encoding="utf-8")
    (d / "mcq_local.yaml").write_text(MCQ_YAML.format(path=DATA / "mcq_demo.jsonl"), encoding="utf-8")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    # only the local YAMLs: indexing lm-eval's ~10k built-in task files takes 10-20 s here
    out = lm_eval.simple_evaluate(model=lm, tasks=["kmmlu_local", "mcq_local"],
                                  task_manager=TaskManager(include_path=str(d), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    return out, d


def _lm_eval_lls(out, task):
    by_doc = {}
    for s in out["samples"][task]:
        by_doc[s["doc"]["id"]] = [float(r[0]) for r in s["filtered_resps"]]
    return by_doc


def test_kmmlu_matches_lm_eval(smol, lm_eval_run):
    model, tok = smol
    out, d = lm_eval_run
    # our side reads the CSV (the lm-eval side the JSONL copy); batching packs several questions per forward
    spec = TaskSpec(name="k", kind="kmmlu", path=str(DATA / "kmmlu_ko_demo.csv"))
    res = Evaluator([spec], tok, split="all", batch_tokens=2048).evaluate(model, per_item=True)
    assert len(res.per_item["k"]) == 40
    worst = compare_logliks(res.per_item["k"], _lm_eval_lls(out, "kmmlu_local"))
    print(f"kmmlu 0-shot: max relative difference {worst:.2e}")
    assert res.metrics["k"]["acc"] == pytest.approx(out["results"]["kmmlu_local"]["acc,none"], abs=1e-9)


def test_choice_text_mcq_matches_lm_eval(smol, lm_eval_run):
    model, tok = smol
    out, _ = lm_eval_run
    spec = TaskSpec(name="m", kind="mcq", path=str(DATA / "mcq_demo.jsonl"))
    res = Evaluator([spec], tok, split="all", batch_tokens=512).evaluate(model, per_item=True)
    worst = compare_logliks(res.per_item["m"], _lm_eval_lls(out, "mcq_local"))
    print(f"mcq 0-shot: max relative difference {worst:.2e}")
    r = out["results"]["mcq_local"]
    assert res.metrics["m"]["acc"] == pytest.approx(r["acc,none"], abs=1e-9)
    assert res.metrics["m"]["acc_norm"] == pytest.approx(r["acc_norm,none"], abs=1e-9)


def test_generation_matches_plain_generate_loop(smol):
    model, tok = smol
    spec = TaskSpec(name="g", kind="generation", path=str(DATA / "math_mgsm_style.jsonl"), stop=["\n"],
                    max_new_tokens=12, n_search=8, seed=3)
    ev = Evaluator([spec], tok, split="search", batch_tokens=1024)
    res = ev.evaluate(model, per_item=True)
    rows = {r["id"]: r for r in map(json.loads, (DATA / "math_mgsm_style.jsonl").read_text().splitlines())}
    correct = []
    eos = tok.eos_token_id
    for item_id in ev.split_ids()["g"]:
        row = rows[item_id]
        enc = tok(row["prompt"], return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        text = cut_at_stop(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), ["\n"])
        assert res.per_item["g"][item_id]["output"] == text, item_id
        pred = normalize_answer(extract_answer(text, numeric=normalize_number(row["answer"]) is not None))
        correct.append(pred == normalize_answer(row["answer"]))
    assert res.metrics["g"]["exact_match"] == pytest.approx(sum(correct) / len(correct))
    assert 0 < sum(correct) < len(correct)  # a non-trivial comparison: some right, some wrong

