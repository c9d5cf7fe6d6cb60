"""`evomerge eval MODEL TASK...`: score a model folder, hub id or GGUF file on tasks and print a table.

A TASK is a data file (kind guessed: KMMLU columns -> kmmlu, `choices` -> mcq, `prompt` -> generation),
a YAML file holding one task spec or a `tasks:` list, or an inline spec `key=value,key=value`
(e.g. `kind=kmmlu,path=ko.csv,per_category=5`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model on benchmark tasks (KMMLU, MCQ, generation, lm-eval, custom)",
                       description="Score a model folder, hub id or GGUF file on task files, task YAMLs or inline "
                                   "specs, and print a table of metrics.")
    p.add_argument("model", help="HF folder, hub id, or .gguf file")
    p.add_argument("tasks", nargs="+", help="task data file, task YAML, or inline spec 'kind=..,path=..'")
    p.add_argument("--split", choices=["search", "heldout", "all"], default="all", help="which subset to score")
    p.add_argument("--n", type=int, default=None, help="score a seeded, stratified subset of N items per task")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype the model is scored in")
    p.add_argument("--batch-tokens", type=int, default=8192, help="token budget per forward batch")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
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
    import json

    from rich.console import Console
    from rich.table import Table

    from evomerge.evaluate.evaluator import Evaluator

    specs, base_dir = parse_task_args(args.tasks, n=args.n, chat=args.chat_template)
    split = args.split
    if args.n is not None and split == "all":
        split = "search"
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    ev = Evaluator(specs, tok, split=split, device=args.device, batch_tokens=args.batch_tokens, base_dir=base_dir)
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
