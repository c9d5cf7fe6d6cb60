"""`evomerge` command line: each subcommand lives in evomerge/commands/<name>.py with register(subparsers).

Every error is one line on stderr naming the file and the key (`--traceback`, before or after the
subcommand, shows Python's traceback instead); known library warnings are filtered once (`--verbose` shows them).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from evomerge.errors import EvomergeError
from evomerge.yamlio import one_line

COMMANDS = ["merge", "eval", "run", "resume", "worker", "report", "export", "validate", "demo"]
GLOBAL_FLAGS = {
    "--traceback": "on an error, show the full Python traceback instead of the one-line message",
    "--verbose": "show library warnings evomerge filters as noise, and evomerge's INFO log lines",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors on one line (argparse prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _add_global_flags(parser: argparse.ArgumentParser, *, default: object) -> None:
    for flag, text in GLOBAL_FLAGS.items():
        parser.add_argument(flag, action="store_true", default=default, help=text)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command; a command module that fails to import is an error, never skipped."""
    parser = OneLineParser(prog="evomerge",
                           description="Evolve LLM merge recipes and export them as mergekit YAML.")
    _add_global_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of: " + ", ".join(COMMANDS) + " (evomerge COMMAND --help for more)")
    for name in COMMANDS:
        module = importlib.import_module(f"evomerge.commands.{name}")
        module.register(sub)
    for cmd in sub.choices.values():  # also after the command; SUPPRESS keeps a flag given before it
        _add_global_flags(cmd, default=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    try:
        parser = build_parser()
    except Exception as exc:
        if show_traceback:
            raise
        print(f"evomerge: error: a command failed to load: {type(exc).__name__}: {one_line(exc)} "
              "(--traceback shows where)", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    from evomerge import quiet

    quiet.install(verbose=args.verbose)
    prog = f"evomerge {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        print(f"{prog}: error: {_one_line_error(exc, args)}", file=sys.stderr)
        return 2 if isinstance(exc, EvomergeError) else 1


def _one_line_error(exc: Exception, args: argparse.Namespace) -> str:
    """The user's error as its one line; pydantic's (deep inside planning) as a ConfigError naming the command's
    input file; anything else as its type and message, with the way to see more."""
    from pydantic import ValidationError

    if isinstance(exc, EvomergeError):
        return str(exc)
    if isinstance(exc, ValidationError):
        from evomerge.yamlio import validation_error

        source = getattr(args, getattr(args, "input_arg", "") or "", None)  # the command's input file
        return str(validation_error(exc, str(source) if isinstance(source, str) else "<input>"))
    return f"{type(exc).__name__}: {one_line(exc)} (an unexpected error: --traceback shows where)"


if __name__ == "__main__":
    raise SystemExit(main())
