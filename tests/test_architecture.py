"""The package's shape, checked: imports only run down the layers, Optuna internals in one module, no
circular imports, modules of a readable size (a longer one says why in its docstring)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"

# Lowest first; a module may import its own layer or any layer below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "dtypes", "envvars", "yamlio", "tables", "quiet", "threads"),  # helpers every layer may use
    ("models",),  # weight sources, GGUF, live causal LMs, layouts, vocabularies
    ("recipe",),  # the mergekit recipe format
    ("merge",),  # merge maths, plans, the resident merger, stacking, materializing folders
    ("evaluate",),  # tasks, splits, scoring a live model
    ("config",),  # the search-space schema (names methods, tasks)
    ("spaces",),  # genome <-> candidate, behind the GenomeSpace / Merger protocols
    ("store",),  # run folder, Optuna storage, trial records
    ("search",),  # optimizers and the search loop (genomes and fitness only)
    ("report",),  # plots and tables of a stored run
    ("workflow", "validate"),  # wiring a run end to end
    ("demo", "commands", "cli", "__main__"),  # entry points
]
LINE_LIMIT = 400


def _layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("evomerge")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evomerge"):
            found.append((node.module, node.lineno))
    return found


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for name, path in _modules().items():
        if name == "evomerge":
            continue
        mine = _layer_of(name)
        for target, line in _imports(path):
            if target != "evomerge" and _layer_of(target) > mine:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def _module_level_imports(path: Path) -> set[str]:
    """evomerge modules imported when `path` is imported (imports inside functions run later)."""
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("evomerge")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evomerge"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_circular_imports():
    modules = _modules()
    graph = {name: {m for m in _module_level_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("circular import: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for nxt in sorted(graph[name]):
            if not (name.startswith(nxt + ".") or nxt == "evomerge"):  # a package's own __init__
                visit(nxt, stack + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_every_module_imports():
    import subprocess
    import sys

    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in sorted(_modules()))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_optuna_internals_are_touched_in_one_module_only():
    pattern = re.compile(r"_storage|_trial_id|_study_id|storages\._rdb")
    users = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text()))
    assert users == ["evomerge/store/backend.py"]


def test_long_modules_say_why():
    for path in PACKAGE.rglob("*.py"):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > LINE_LIMIT:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            assert "one module" in doc.lower(), f"{path.relative_to(PACKAGE.parent)} has {n} lines and its " \
                                                f"docstring does not say why it must be one module"


def test_layers_cover_the_whole_package():
    for name in _modules():
        if name != "evomerge":
            _layer_of(name)
    assert importlib.import_module("evomerge")
