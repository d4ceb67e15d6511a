"""The ``weightcast`` command line.

Each sub-command lives in its own ``launch/cmd_*.py`` module exposing ``register(subparsers)``;
handlers return an exit status. A :class:`WeightcastError` is printed on stderr without a
traceback and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from orchestrator.errors import WeightcastError

COMMAND_MODULES = (
    "launch.cmd_inspect",   # inspect, synth
    "launch.cmd_plan",      # plan
    "launch.cmd_load",      # load, demo
    "launch.cmd_save",      # save
    "launch.cmd_launch",    # launch
    "launch.cmd_cache",     # cache verify | repair
    "launch.cmd_bench",     # bench
    "launch.cmd_emulate",   # emulate
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightcast",
        description="Load safetensors checkpoints onto many ranks: each byte read once per cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command whose module is not part of this build
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except WeightcastError as exc:
        print(f"weightcast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"weightcast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
