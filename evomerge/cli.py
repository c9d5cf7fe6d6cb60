"""`evomerge` command line: each subcommand lives in evomerge/commands/<name>.py with register(subparsers)."""

from __future__ import annotations

import argparse
import importlib
import sys

from evomerge.errors import EvomergeError

COMMANDS = ["merge", "eval", "run", "resume", "report", "export", "validate", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge",
                                     description="Evolve LLM merge recipes and export them as mergekit YAML.")
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"evomerge.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet stays out of the menu
            if exc.name == f"evomerge.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EvomergeError as exc:
        if args.traceback:
            raise
        print(f"evomerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evomerge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
