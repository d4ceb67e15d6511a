"""``weightcast emulate up | down | run | configs``: the emulated multi-node cluster (network
namespaces, shaped links, throttled FUSE storage) and its benchmark. Needs root.

A thin wrapper around ``python -m benchmarks.cluster_emu.run`` (same options): ``run`` sweeps
the loaders over the node counts and writes the results table; ``up`` / ``down`` bring a cluster
up for manual experiments and remove everything it made; ``configs`` writes
``cluster_configs/emu-Nn.yaml``. The ``benchmarks`` package lives in the repository, beside
``launch``; it is imported only when this command runs.
"""
from __future__ import annotations

import argparse
import os
import sys

ACTIONS = {
    "run": "sweep every loader over the node counts; print and write the results table",
    "up": "bring one emulated cluster up (first --nodes count) and leave it running",
    "down": "remove everything the emulation made (processes, mounts, namespaces)",
    "configs": "write cluster_configs/emu-<N>n.yaml for the topology",
}


def _harness():
    """The benchmark's command module (the repository root is put on sys.path if needed)."""
    try:
        from benchmarks.cluster_emu import run
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(root, "benchmarks", "cluster_emu")):
            raise
        sys.path.insert(0, root)
        from benchmarks.cluster_emu import run
    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("emulate", help="emulated multi-node cluster benchmark (root)",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="emulate_command", metavar="ACTION")
    try:
        harness = _harness()
    except ImportError as exc:  # an installed copy without the repository's benchmarks/
        parser.set_defaults(func=lambda args: _unavailable(exc))
        return
    for action, text in ACTIONS.items():
        p = sub.add_parser(action, help=text, description=text)
        harness.add_arguments(p)
        p.set_defaults(func=_handler(action))
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _unavailable(exc: ImportError) -> int:
    print(f"weightcast emulate: error: the benchmark package is not importable ({exc}); run it "
          "from a checkout of the repository (it lives in benchmarks/cluster_emu/)", file=sys.stderr)
    return 2


def _handler(action: str):
    def run(args: argparse.Namespace) -> int:
        return _harness().execute(action, args)
    return run
