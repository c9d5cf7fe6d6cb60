"""A CMA-ES run with a fixed seed gives the same trials (genomes, values, statuses) as the run recorded in
`fingerprints/cmaes_tiny.json`, which was made before the store, the optimizers and the genome spaces were
reshaped: any change of behaviour in the search loop, the genome <-> recipe map, the merge or the scoring
shows up here. Regenerate only for an intended change: `python tests/search/test_fingerprint.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
FINGERPRINT = HERE / "fingerprints" / "cmaes_tiny.json"


def _space(fam: dict[str, Path], tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        a, b = (int(x) for x in rng.integers(10, 50, size=2))
        choices = [str(a + b), str(a + b + 1), str(a + b - 1), str(a + b + 10)]
        order = rng.permutation(4)
        rows.append({"id": f"q{i}", "question": f"add:{a}+{b}=", "choices": [choices[j] for j in order],
                     "answer": int(np.where(order == 0)[0][0])})
    (tmp / "mcq.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = {
        "name": "fingerprint",
        "models": {k: str(v) for k, v in fam.items()},
        "base_model": "base",
        "merge_method": "ties",
        "parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.1, 1.0]}},
        "granularity": "block",
        "block_size": 2,
        "tasks": [{"name": "add", "kind": "mcq", "path": str(tmp / "mcq.jsonl"), "n_search": 10,
                   "n_heldout": 10, "loss_tiebreak": 0.01,
                   "continuous": 0.0}],  # the fitness as it was when the fingerprint was recorded
        "optimizer": {"name": "cmaes", "popsize": 4},
        "budget": {"trials": 12},
        "heldout": {"top_k": 1, "sources": False, "baselines": False},
        "seed": 5,
        "warm_start": False,  # the search loop as it was when the fingerprint was recorded
        "run_dir": str(tmp / "run"),
    }
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fingerprint(fam: dict[str, Path], tmp: Path) -> list[dict]:
    from evomerge.store import RunStore
    from evomerge.workflow.run import start_run

    run = start_run(_space(fam, tmp), quiet=True)
    store = RunStore.open(run)
    out = [{"number": t.number, "status": t.status, "genome": [round(float(g), 10) for g in t.genome],
            "values": [round(float(v), 6) for v in (t.values or [])]} for t in store.trials()]
    store.close()
    return out


def test_cmaes_run_equals_the_recorded_fingerprint(llama_family, tmp_path):
    expected = json.loads(FINGERPRINT.read_text())
    got = fingerprint(llama_family, tmp_path)
    assert [t["number"] for t in got] == [t["number"] for t in expected]
    for g, e in zip(got, expected):
        assert g["status"] == e["status"], g["number"]
        np.testing.assert_allclose(g["genome"], e["genome"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(g["values"], e["values"], rtol=0, atol=2e-6)


if __name__ == "__main__":
    import tempfile

    import torch

    sys.path.insert(0, str(HERE.parents[1]))
    torch.set_num_threads(1)
    from evomerge.models.tiny import make_family

    with tempfile.TemporaryDirectory() as d:
        fam = make_family(Path(d) / "llama", "llama")
        (Path(d) / "w").mkdir()
        FINGERPRINT.write_text(json.dumps(fingerprint(fam, Path(d) / "w"), indent=1) + "\n")
    print("wrote", FINGERPRINT)
