"""`evomerge eval MODEL TASK...`: score a model folder, hub id or GGUF file on tasks and print a table.

A TASK is a data file (kind guessed: KMMLU columns -> kmmlu, `choices` -> mcq, `prompt` -> generation),
a YAML file holding one task spec or a `tasks:` list, or an inline spec `key=value,key=value`
(e.g. `kind=kmmlu,path=ko.csv,per_category=5`).

`evomerge eval runs/NAME --split heldout` re-scores a run's evolved recipe as the held-out table scored it: its
best.yaml materialized into a temporary folder, the run's tasks (its config.yaml), the items of splits.json, the
run's dtype and device, and the held-out table's metric per task and their mean; it prints the row of heldout.json
it reproduces. `evomerge eval MODEL --run runs/NAME` scores an already materialized model (or any other) so.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError
from evomerge.threads import CLI_HELP, apply_threads, choose_threads, cli_count, request_threads

Split = Literal["search", "selection", "heldout", "all"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model on benchmark tasks (KMMLU, MCQ, generation, lm-eval, custom), "
                                    "or re-score a run's recipe on its held-out split",
                       description="Score a model folder, hub id or GGUF file on task files, task YAMLs or inline "
                                   "specs, and print a table of metrics. Given a run folder (runs/NAME) instead, "
                                   "score its best.yaml on the run's own tasks and split items, as its held-out "
                                   "table did.")
    p.add_argument("model", help="HF folder, hub id, .gguf file, or a run folder (runs/NAME: its best.yaml)")
    p.add_argument("tasks", nargs="*", help="task data file, task YAML, or inline spec 'kind=..,path=..' "
                                            "(none with a run: the run's tasks)")
    p.add_argument("--run", dest="run_dir", metavar="RUN_DIR", default=None,
                   help="score MODEL on this run's tasks and split items (runs/NAME)")
    p.add_argument("--split", choices=["search", "selection", "heldout", "all"], default=None,
                   help="which subset to score (default: heldout for a run, else all, or search with --n)")
    p.add_argument("--n", type=int, default=None, help="score a seeded, stratified subset of N items per task")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the run's device, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="dtype the model is scored in (default: the run's dtype, else float32)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="token budget per forward batch (task arguments only: a run's tasks are batched as the "
                        "run batched them)")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--threads", type=cli_count, metavar="N", help=CLI_HELP)
    p.add_argument("--json", dest="json_out", default=None, help="also write metrics and split ids to this JSON file")
    p.set_defaults(func=run, input_arg="model")


def _guess_kind(path: Path) -> str:
    from evomerge.evaluate.data import read_records

    rows = read_records(path)
    keys = set(rows[0]) if rows else set()
    if {"question", "A", "B", "C", "D", "answer"} <= keys:
        return "kmmlu"
    if {"question", "choices", "answer"} <= keys:
        return "mcq"
    if {"prompt", "answer"} <= keys:
        return "generation"
    raise ConfigError("cannot tell the task kind from the columns " + str(sorted(keys)), file=str(path),
                      allowed="KMMLU (question,A,B,C,D,answer), MCQ (question,choices,answer), "
                              "generation (prompt,answer)")


def _coerce(value: str):
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def parse_task_args(tasks: list[str], *, n: int | None, chat: bool) -> tuple[list, Path | None]:
    """TaskSpecs from the command line (files, YAML specs, inline specs)."""
    import yaml
    from pydantic import ValidationError

    from evomerge.evaluate.spec import TaskSpec
    from evomerge.yamlio import one_line, read_text, validation_error

    raw: list[dict] = []
    base_dir = None
    for arg in tasks:
        p = Path(arg)
        if p.suffix.lower() in (".yaml", ".yml") and p.is_file():
            try:
                doc = yaml.safe_load(read_text(p, what="task YAML"))
            except yaml.YAMLError as exc:
                raise ConfigError(f"malformed YAML: {one_line(getattr(exc, 'problem', None) or exc)}",
                                  file=str(p)) from None
            entries = doc.get("tasks", doc) if isinstance(doc, dict) else doc
            entries = entries if isinstance(entries, list) else [entries]
            if not all(isinstance(e, dict) for e in entries):
                raise ConfigError("a task YAML holds one task spec (a mapping) or a `tasks:` list of them",
                                  file=str(p), key="tasks")
            raw.extend(dict(e, _src=str(p)) for e in entries)
            base_dir = p.parent
        elif p.is_file():
            raw.append({"name": p.stem, "kind": _guess_kind(p), "path": str(p), "_src": arg})
        elif "=" in arg:
            entry = {k.strip(): _coerce(v) for k, v in (kv.split("=", 1) for kv in arg.split(","))}
            entry.setdefault("name", str(entry.get("lm_eval_task") or Path(str(entry.get("path", "task"))).stem))
            raw.append(dict(entry, _src=arg))
        else:
            raise ConfigError("not a file, YAML spec or key=value spec", file=arg, key="TASK")
    specs = []
    for entry in raw:
        src = entry.pop("_src")
        if n is not None:
            entry.setdefault("n_search", n)
        if chat:
            entry["chat_template"] = True
        try:
            specs.append(TaskSpec(**entry))
        except ValidationError as exc:
            raise validation_error(exc, src) from None
    return specs, base_dir


def load_model(ref: str, *, dtype: str, device: str):
    """(model, tokenizer) of a folder, hub id or GGUF file."""
    from evomerge.dtypes import DTYPES
    from evomerge.models.causal_lm import load_causal_lm

    return load_causal_lm(ref, dtype=DTYPES[dtype], device=device)


def run(args: argparse.Namespace) -> int:
    from evomerge.store import RunFolder

    request_threads(args.threads)
    if args.run_dir is not None or (not args.tasks and RunFolder(args.model).config.is_file()):
        if args.tasks or args.n is not None or args.chat_template:
            raise ConfigError("a run's tasks are scored as the run scored them: give no TASK, --n or "
                              "--chat-template with a run", key="--run" if args.run_dir else "MODEL")
        return run_on_run(args)
    if not args.tasks:
        raise ConfigError("give TASK files or specs to score on, or a run folder (runs/NAME)", key="TASK",
                          file=args.model)
    return run_on_tasks(args)


def run_on_tasks(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from evomerge.evaluate.evaluator import Evaluator
    from evomerge.evaluate.tasks import context_length

    apply_threads(choose_threads(None))
    specs, base_dir = parse_task_args(args.tasks, n=args.n, chat=args.chat_template)
    split: Split = args.split or ("search" if args.n is not None else "all")
    device, dtype = args.device or "cpu", args.dtype or "float32"
    model, tok = load_model(args.model, dtype=dtype, device=device)
    ev = Evaluator(specs, tok, split=split, device=device, batch_tokens=args.batch_tokens, base_dir=base_dir,
                   max_length=context_length(model.config, tok))
    res = ev.evaluate(model)
    ids = ev.split_ids()
    table = Table(title=f"{args.model}  ({split} split, {res.seconds:.1f} s)")
    table.add_column("task")
    table.add_column("kind")
    table.add_column("items", justify="right")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for spec in specs:
        m = res.metrics[spec.name]
        first = True
        for key, val in m.items():
            if key == "objective":
                continue
            table.add_row(spec.name if first else "", spec.kind if first else "",
                          str(len(ids[spec.name]) or "-") if first else "",
                          key + (" *" if key == spec.objective_metric else ""), f"{val:.4f}")
            first = False
    table.caption = f"fitness (weighted sum of * metrics) = {res.fitness:.4f}"
    Console().print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(res.to_dict(), split=split, split_ids=ids), indent=2,
                                                  ensure_ascii=False), encoding="utf-8")
    return 0


def run_on_run(args: argparse.Namespace) -> int:
    """Score best.yaml of a run (or MODEL with --run) on the run's tasks and split items, as heldout.py does."""
    import json
    import os
    import tempfile

    from evomerge.config import parse_search_space
    from evomerge.models.causal_lm import load_causal_lm
    from evomerge.store import RunFolder, RunStore
    from evomerge.workflow.context import build_context
    from evomerge.workflow.heldout import score_row

    folder = RunFolder(args.run_dir or args.model)
    store = RunStore.open(folder.root, verify_config=False)
    try:
        meta = store.meta
    finally:
        store.close()
    for var, value in meta.get("env", {}).items():  # ${VAR}s in the snapshot resolve as when the run started
        os.environ.setdefault(var, value)
    text = folder.config.read_text(encoding="utf-8")
    config = parse_search_space(text, source=str(folder.config))
    config.device = args.device or config.device
    config.dtype = args.dtype or config.dtype
    apply_threads(choose_threads(config.threads))
    split: Split = args.split or "heldout"
    ctx = build_context(config, text, source=str(folder.config), base_dir=Path(meta.get("base_dir", folder.root)),
                        refs=meta.get("refs"), load=False, run_dir=folder.root)
    ctx.tokenizer = ctx.space.tokenizer_source().tokenizer()  # the tokenizer the run scored with
    ids = _check_split_ids(ctx.evaluator(split).split_ids(), folder, split)
    with tempfile.TemporaryDirectory(prefix="evomerge-eval-") as tmp:
        if args.run_dir is None:
            if not folder.best.is_file():
                raise ConfigError("the run has no best.yaml yet (a run writes it when its search ends; "
                                  "`evomerge resume` finishes it)", file=str(folder.root))
            from evomerge.merge.materialize import materialize
            from evomerge.recipe import Recipe

            ref = str(materialize(Recipe.load(folder.best), Path(tmp) / "model", progress=False,
                                  recipe_source=str(folder.best)))
            what = f"{folder.best} (materialized)"
        else:
            ref = what = args.model
        model, _ = load_causal_lm(ref, dtype=DTYPES[config.dtype], device=config.device)
        row, _ = score_row(ctx, model, split)
        del model
    recorded = _recorded_row(folder) if args.run_dir is None and split == "heldout" else None
    _print_row(row, recorded, what=what, split=split, ids=ids, tasks=[(t.name, t.objective_metric)
                                                                      for t in config.tasks])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": what, "split": split, "row": row, "recorded": recorded,
                                                   "split_ids": ids}, indent=2, ensure_ascii=False),
                                       encoding="utf-8")
    return 1 if "error" in row else 0


def _check_split_ids(ids: dict[str, list], folder, split: str) -> dict[str, list]:
    """The items chosen now must be the run's (splits.json), else its task data changed since the run."""
    import json

    from evomerge.errors import DataError

    if split == "all":
        return ids
    try:
        recorded = json.loads(folder.splits.read_text(encoding="utf-8")).get(split, {})
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"cannot read the run's split items: {exc}", file=str(folder.splits)) from None
    for task, items in ids.items():
        if task in recorded and [str(i) for i in recorded[task]] != [str(i) for i in items]:
            raise DataError(f"the {split} items of task '{task}' are not the run's: its data changed since the run",
                            file=str(folder.splits), key=f"{split}.{task}")
    return ids


def _recorded_row(folder) -> dict | None:
    """The evolved recipe's row of the run's held-out table (heldout.json), if there is one."""
    import json

    from evomerge.report.data import heldout_rows

    try:
        rows = heldout_rows(json.loads(folder.heldout_json.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
    return next((r for r in rows if str(r.get("name", "")).startswith("evolved #1")), None)


def _print_row(row: dict, recorded: dict | None, *, what: str, split: str, ids: dict[str, list],
               tasks: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from evomerge.report.data import number

    def show(v: object) -> str:
        if isinstance(v, (list, tuple)):
            return " to ".join(show(x) for x in v)
        x = number(v)
        return "-" if v is None else f"{x:.4f}" if x is not None else str(v)

    table = Table(title=f"{what}  ({split} split)")
    for col, justify in (("task", "left"), ("metric", "left"), ("items", "right"), ("value", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    if recorded is not None:
        table.add_column(f"heldout.json: {recorded.get('name')}", justify="right")
    for name, metric in tasks + [("mean", "mean of the tasks"), ("ci95", "95 % interval of the mean")]:
        if name == "ci95" and "ci95" not in row:
            continue
        cells = [name, metric, str(len(ids.get(name, [])) or "") if name not in ("mean", "ci95") else "",
                 show(row.get(name))]
        table.add_row(*cells, *([show(recorded.get(name))] if recorded is not None else []))
    if recorded is not None:
        same = all(number(row.get(k)) == number(recorded.get(k)) for k, _ in tasks + [("mean", "")])
        table.caption = "equal to the run's held-out row" if same else "NOT equal to the run's held-out row"
    Console().print(table)
    if "error" in row:
        Console(stderr=True).print(f"scoring failed: {row['error']}")
