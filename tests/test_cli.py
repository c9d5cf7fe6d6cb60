"""The command line: every error is one line on stderr naming the file and the key, never a traceback (unless
`--traceback`, before or after the command); every command and argument has help; a command module that fails
to import is an error, not a missing command; known library warnings are filtered once (`--verbose` shows them).

Each error case runs `python -m evomerge ...` in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from evomerge import cli, quiet

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "max_position_embeddings": 256}
REPO = Path(__file__).resolve().parents[1]

# what a file of each kind looks like when it is binary, not UTF-8, cut short, or empty
BAD = {
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
    "latin1": "name: caf\xe9\n".encode("latin-1"),
    "empty": b"",
}


def evomerge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "evomerge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line_error(res: subprocess.CompletedProcess, *names: str) -> str:
    """Exit code != 0, exactly one line on stderr, no traceback, every one of `names` in it."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, res.stdout
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """A valid space over config-only tiny models and a task file."""
    root = tmp_path_factory.mktemp("cli")
    for name in ("base", "a"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(TINY))
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) + "\n"
                                            for i in range(40)))
    space = {"name": "t", "models": {"base": "./base", "a": "./a"}, "base_model": "base", "merge_method": "ties",
             "parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.1, 1.0]}},
             "tasks": [{"name": "g", "kind": "generation", "path": "gen.jsonl", "n_search": 10, "n_heldout": 10}],
             "budget": {"trials": 4}}
    (root / "ok.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    return root


def _variant(proj: Path, name: str, **over) -> str:
    data = yaml.safe_load((proj / "ok.yaml").read_text()) | over
    (proj / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return name


def test_a_valid_space(proj):
    res = evomerge("validate", "ok.yaml", cwd=proj)
    assert res.returncode == 0, res.stderr
    # granularity auto: 10 search items, a curve of 2 points x weight, density
    assert "ok.yaml: ok" in res.stdout and "2 models" in res.stdout and "4 genes" in res.stdout


# -- every file the tool reads: binary, not UTF-8, cut short, empty ---------------------------------

@pytest.mark.parametrize("kind", ["binary", "latin1", "truncated", "empty"])
def test_bad_search_space_file(proj, kind):
    path = proj / f"space_{kind}.yaml"
    text = (proj / "ok.yaml").read_bytes()
    path.write_bytes(text[: text.index(b"tasks:") + 20] if kind == "truncated" else BAD[kind])
    msg = one_line_error(evomerge("validate", path.name, cwd=proj), path.name)
    assert {"binary": "binary", "latin1": "not UTF-8", "truncated": "line", "empty": "empty"}[kind] in msg


@pytest.mark.parametrize("kind", ["binary", "latin1", "truncated", "empty"])
def test_bad_recipe_file(proj, kind):
    path = proj / f"recipe_{kind}.yaml"
    cut = b"merge_method: ties\nmodels:\n  - model: ./a\n    parameters: {weight: [0.1, 0."
    path.write_bytes(cut if kind == "truncated" else BAD[kind])
    one_line_error(evomerge("merge", path.name, "out", cwd=proj), path.name)
    assert not (proj / "out").exists()


@pytest.mark.parametrize("kind", ["binary", "latin1", "truncated", "empty"])
def test_bad_task_file(proj, kind):
    data = (proj / "gen.jsonl").read_bytes()
    (proj / f"task_{kind}.jsonl").write_bytes(data[:-9] if kind == "truncated" else BAD[kind])
    task = {"name": "g", "kind": "generation", "path": f"task_{kind}.jsonl", "n_search": 10, "n_heldout": 10}
    space = _variant(proj, f"task_{kind}.yaml", tasks=[task])
    one_line_error(evomerge("validate", space, cwd=proj), f"task_{kind}.jsonl", "key 'tasks.0.path'")


@pytest.mark.parametrize("kind", ["binary", "latin1", "truncated", "empty"])
def test_bad_config_json(proj, kind):
    model = proj / f"model_{kind}"
    model.mkdir(exist_ok=True)
    text = json.dumps(TINY).encode()
    (model / "config.json").write_bytes(text[:40] if kind == "truncated" else BAD[kind])
    space = _variant(proj, f"model_{kind}.yaml", models={"base": "./base", "a": f"./{model.name}"})
    one_line_error(evomerge("validate", space, cwd=proj), f"{model.name}/config.json", "key 'models.a'",
                   f"model_{kind}.yaml")


# -- numbers and sizes given as text ------------------------------------------------------------------

def test_number_given_as_text(proj):
    space = _variant(proj, "ten.yaml", budget={"trials": 4, "seconds": "ten"})
    one_line_error(evomerge("validate", space, cwd=proj), "ten.yaml", "key 'budget.seconds'", "'ten'")
    space = _variant(proj, "neg.yaml", budget={"trials": 4, "seconds": -1})
    one_line_error(evomerge("validate", space, cwd=proj), "neg.yaml", "key 'budget.seconds'")


def test_size_given_as_text(proj):
    one_line_error(evomerge("merge", "r.yaml", "out", "--shard-size", "5XB", cwd=proj), "--shard-size", "5XB")


def test_removed_key(proj):
    data = yaml.safe_load((proj / "ok.yaml").read_text())
    data.update(merge_method=None, parameters={}, stacking={"mode": "dfs", "use_ps_result": True})
    (proj / "old.yaml").write_text(yaml.safe_dump(data))
    one_line_error(evomerge("validate", "old.yaml", cwd=proj), "old.yaml", "key 'stacking.use_ps_result'",
                   "unknown key", "ps_recipe")


# -- errors from deep inside: pydantic in planning, a missing trial ----------------------------------

def test_pydantic_error_inside_planning(tmp_path):
    """`models:` of 4 and 2 layers: merge/plan.py builds a slice whose sources span different layer counts."""
    from evomerge.models.tiny import make_family

    fam = make_family(tmp_path / "fam", names=("base", "a"))
    short = make_family(tmp_path / "short", names=("short",), num_layers=2)["short"]
    recipe = {"merge_method": "ties", "base_model": str(fam["base"]),
              "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": str(short), "parameters": {"weight": 1.0, "density": 0.5}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    one_line_error(evomerge("merge", "r.yaml", "out", cwd=tmp_path), "r.yaml", "key 'models'",
                   "same number of layers")
    assert not (tmp_path / "out").exists()


def test_export_of_a_missing_trial(tmp_path):
    from evomerge.store import RunStore

    RunStore.create(tmp_path / "run", "name: x\n", directions=["maximize"])
    one_line_error(evomerge("export", "run", "out.yaml", "--trial", "500", cwd=tmp_path), "run", "key '--trial'",
                   "500")


# -- --traceback, before and after the command --------------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_traceback_flag(proj, where):
    args = ["--traceback", "validate", "nope.yaml"] if where == "before" else ["validate", "nope.yaml", "--traceback"]
    res = evomerge(*args, cwd=proj)
    assert res.returncode != 0 and "Traceback" in res.stderr and "nope.yaml" in res.stderr


# -- in-process: the parser, imports, warnings --------------------------------------------------------

def test_every_command_and_argument_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub._get_subactions()}
    assert set(helps) == set(cli.COMMANDS) and all(helps.values()), helps
    missing = [f"{name} {a.dest}" for name, p in sub.choices.items() for a in p._actions
               if a.dest != "help" and not a.help]
    assert not missing, missing


def test_a_command_that_fails_to_import_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ["nosuch"])
    assert cli.main(["validate", "x.yaml"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evomerge.commands.nosuch" in err[0]


def _emit_known_warnings() -> None:
    """The very warnings transformers' kwarg deprecation and Optuna's experimental decorator emit."""
    from optuna._experimental import experimental_func
    from transformers.utils.deprecation import deprecate_kwarg

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(cache=None):
        return cache

    @experimental_func("4.0.0")
    def sampler():
        return None

    forward(past_key_values=1)
    sampler()
    warnings.warn("something else", FutureWarning, stacklevel=1)


@pytest.mark.parametrize("verbose", [False, True])
def test_known_warnings_are_filtered_unless_verbose(monkeypatch, verbose):
    monkeypatch.setattr(quiet, "_installed", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet.install(verbose=verbose)
        _emit_known_warnings()
    messages = [str(w.message) for w in seen]
    if verbose:
        assert len(messages) == 3 and "past_key_values" in messages[0] and "experimental" in messages[1]
    else:
        assert messages == ["something else"]


@pytest.mark.parametrize("argv,verbose", [(["validate", "x.yaml"], False), (["--verbose", "validate", "x.yaml"], True),
                                          (["validate", "x.yaml", "--verbose"], True)])
def test_the_cli_installs_the_filter_once(monkeypatch, argv, verbose):
    calls = []
    monkeypatch.setattr(quiet, "install", lambda *, verbose=False: calls.append(verbose))
    cli.main(argv)
    assert calls == [verbose]
