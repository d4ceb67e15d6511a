"""The ``weightcast`` command line.

Each sub-command lives in its own ``launch/cmd_*.py`` module exposing ``register(subparsers)``;
handlers return an exit status. A :class:`WeightcastError` is printed on stderr without a
traceback and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from weightcast.orchestrator.errors import WeightcastError

COMMANDS = {  # sub-command -> the module that registers it
    "inspect": "weightcast.launch.cmd_inspect", "synth": "weightcast.launch.cmd_inspect",
    "plan": "weightcast.launch.cmd_plan",
    "load": "weightcast.launch.cmd_load", "demo": "weightcast.launch.cmd_load",
    "save": "weightcast.launch.cmd_save",
    "launch": "weightcast.launch.cmd_launch",
    "cache": "weightcast.launch.cmd_cache",
    "bench": "weightcast.launch.cmd_harness", "emulate": "weightcast.launch.cmd_harness",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` only that sub-command's module is imported (fast start)."""
    parser = argparse.ArgumentParser(
        prog="weightcast",
        description="Load safetensors checkpoints onto many ranks: each byte read once per cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command whose module is not part of this build
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["bench"], ["emulate"]):  # every option belongs to the harness
        from weightcast.launch.cmd_harness import run
        return run(argv[0], argv[1:])
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except WeightcastError as exc:
        print(f"weightcast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM while the local launcher runs ranks
        from weightcast.launch.interrupts import describe, exit_status
        print(f"weightcast {args.command}: {describe(exc)}", file=sys.stderr)
        return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
