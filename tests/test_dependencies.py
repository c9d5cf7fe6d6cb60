"""`pip install .` (no extras) is enough for the GGUF path (`evomerge eval model.gguf ...`).

CI installs the test extra, whose mergekit pulls accelerate, so an ordinary test run cannot notice a
dependency that only an extra provides. The slow test rebuilds what a plain install would hold: a folder of
links to exactly the distributions that [project].dependencies reach (their non-extra requirements, markers
evaluated for this interpreter), and runs `python -S -m evomerge eval` on the real SmolLM2 GGUF with only
that folder and the checkout on sys.path: any module the GGUF path imports (or probes, as transformers probes
accelerate) that no declared dependency provides makes it fail.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
GGUF_PATH_NEEDS = {"gguf", "accelerate"}  # transformers: the gguf reader, and accelerate to load GGUF weights


def declared() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def install_closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Installed distributions a plain install of `requirements` pulls in (extras' requirements left out)."""
    seen: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return seen


def _link(src: Path, dst: Path) -> None:
    """Symlink src at dst; where two distributions share a folder (namespace packages), merge them."""
    if not dst.is_symlink() and not dst.exists():
        dst.symlink_to(src)
        return
    if dst.is_symlink():
        old = dst.resolve()
        if old == src.resolve() or not (old.is_dir() and src.is_dir()):
            return
        dst.unlink()
        dst.mkdir()
        for child in old.iterdir():
            _link(child, dst / child.name)
    if dst.is_dir() and src.is_dir():
        for child in src.iterdir():
            _link(child, dst / child.name)


def plain_install_site(folder: Path, requirements: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for dist in install_closure(requirements).values():
        root = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            if (root / top).exists():
                _link(root / top, folder / top)
    return folder


def test_gguf_dependencies_are_declared_not_only_reachable_through_an_extra():
    names = {canonicalize_name(Requirement(r).name) for r in declared()}
    assert GGUF_PATH_NEEDS <= names
    assert GGUF_PATH_NEEDS <= set(install_closure(declared()))


@pytest.mark.slow
def test_gguf_eval_runs_with_the_declared_dependencies_only(smollm2_gguf, tmp_path):
    task = tmp_path / "add.jsonl"
    task.write_text("\n".join(json.dumps({"question": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1)],
                                          "answer": 0}) for a in (2, 3)) + "\n")

    def run(requirements: list[str]) -> subprocess.CompletedProcess:
        site = plain_install_site(tmp_path / f"site{len(requirements)}", requirements)
        env = os.environ | {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "PYTHONNOUSERSITE": "1"}
        return subprocess.run([sys.executable, "-S", "-m", "evomerge", "eval", str(smollm2_gguf), str(task),
                               "--json", str(tmp_path / "scores.json")],
                              env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    done = run(declared())
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "scores.json").read_text())
    # the check has teeth: the same install without accelerate cannot load GGUF weights
    without = [r for r in declared() if canonicalize_name(Requirement(r).name) != "accelerate"]
    if "accelerate" not in install_closure(without):
        failed = run(without)
        assert failed.returncode != 0 and "accelerate" in failed.stderr
