"""``weightcast bench`` and ``weightcast emulate``: the benchmark harnesses.

The harnesses live in the repository's ``benchmarks/`` folder, which is not part of the installed
package (nothing installed imports it). From a checkout these commands run ``python -m
benchmarks`` (single machine) or ``python -m benchmarks.cluster_emu.run`` (emulated cluster, root)
in that checkout, with the same options; elsewhere they say where to get it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

MODULES = {"bench": ("benchmarks", "benchmark weightcast against its peers on this machine"),
           "emulate": ("benchmarks.cluster_emu.run", "emulated multi-node cluster benchmark (root)")}


def register(sub: argparse._SubParsersAction) -> None:
    for name, (module, text) in MODULES.items():
        p = sub.add_parser(name, help=text, add_help=False,
                           description=f"{text}; runs `python -m {module}` from a repository checkout")
        p.set_defaults(func=lambda args, name=name: run(name, []))


def find_checkout(start: str | None = None) -> str | None:
    """The repository checkout holding ``benchmarks/``: the current directory or one above it,
    else the folder above an editable install's ``launch/``."""
    here = os.path.abspath(start or os.getcwd())
    candidates = [here, *_parents(here), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    for d in candidates:
        if os.path.isfile(os.path.join(d, "benchmarks", "__main__.py")):
            return d
    return None


def _parents(path: str) -> list[str]:
    out = []
    while os.path.dirname(path) != path:
        path = os.path.dirname(path)
        out.append(path)
    return out


def run(name: str, argv: list[str]) -> int:
    """Run the harness ``name`` (``bench`` or ``emulate``) with ``argv``; its exit status."""
    module = MODULES[name][0]
    root = find_checkout()
    if root is None:
        print(f"weightcast {name}: error: the benchmark harness is not installed with the package; "
              f"it lives in benchmarks/ of the weightcast repository. Fix: from a checkout run "
              f"`make bench` (or `python -m {module}`).", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        return subprocess.call([sys.executable, "-m", module, *argv], cwd=root, env=env)
    except KeyboardInterrupt:
        return 130
