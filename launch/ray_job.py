"""Entry point of a Ray job: ``python -m weightcast.launch.ray_job SOURCE [load options] [Ray options]``.

Submitted from the repository root (the job's working directory, so ``-m`` finds the package)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m weightcast.launch.ray_job /abs/path/to/checkpoint --ranks-per-node 2 --verify

The job's driver connects to the cluster (``ray.init()`` reads ``RAY_ADDRESS``, which ``ray job``
sets), calls :func:`weightcast.launch.ray.load_on_ray`, prints the gathered report, optionally verifies
every rank's tensors against safetensors and calls ``--then MODULE:FUNCTION`` with
``(model, report)`` on every rank, then shuts the ranks down. Exit status: 0, 1 when
verification finds differing tensors, 2 on a load error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from weightcast.orchestrator.errors import WeightcastError


def build_parser() -> argparse.ArgumentParser:
    from weightcast.launch.cmd_load import add_load_options
    p = argparse.ArgumentParser(prog="python -m weightcast.launch.ray_job",
                                description="Load a checkpoint on Ray rank actors and print the report.")
    p.add_argument("source", help="checkpoint directory (visible from every node), .safetensors file or repo id")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, as set by `ray job`)")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--ranks-per-node", type=int, default=None, help="default: gpus per node, or 1")
    p.add_argument("--cpus-per-rank", type=float, default=1)
    p.add_argument("--strategy", default=None, help="STRICT_PACK | PACK | SPREAD | STRICT_SPREAD")
    p.add_argument("--report", default=None, help="write the gathered report JSON here")
    p.add_argument("--then", default=None, metavar="MODULE:FUNCTION",
                   help="call FUNCTION(model, report) on every rank after the load")
    add_load_options(p)
    return p


def verify_rank(model: Any, args: dict) -> dict:
    """On a rank actor: bit-for-bit comparison of what the rank owns with safetensors."""
    from weightcast.launch.torchrun import verify
    return verify(args, model)


def then_rank(model: Any, spec: str, report: dict) -> Any:
    """On a rank actor: import ``MODULE:FUNCTION`` there and call it with ``(model, report)``."""
    from weightcast.launch.torchrun import resolve_callable
    return resolve_callable(spec)(model, report)


def run(ns: argparse.Namespace) -> int:
    """The driver: connect, load on the ranks, report, verify, call --then, shut down."""
    import ray
    from weightcast.launch.cmd_load import job_args
    from weightcast.launch.jobs import load_options
    from weightcast.launch.ray import load_on_ray
    from weightcast.workers.report import LoadReport, format_table
    args = job_args(ns)
    if os.path.exists(args["source"]):
        args["source"] = os.path.abspath(args["source"])  # the actors' working directory may differ
    options = load_options(args)
    timeout, cluster = options.pop("timeout", 300.0), options.pop("cluster", None)
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=ns.address)
    connected = time.perf_counter() - t0
    group = load_on_ray(args["source"], num_nodes=ns.num_nodes, gpus_per_node=ns.gpus_per_node,
                        ranks_per_node=ns.ranks_per_node, cpus_per_rank=ns.cpus_per_rank, strategy=ns.strategy,
                        cluster=cluster, timeout=timeout, **options)
    try:
        report = group.report
        print(format_table([LoadReport(**r) for r in report["ranks"]]))
        nodes = len({e["WEIGHTCAST_NODE"] for e in group.envs})
        print(f"storage bytes read: {report['total_read_bytes']:,} (checkpoint {report['checkpoint_bytes']:,}); "
              f"load {report['wall_seconds']:.3f} s; {group.world_size} ranks on {nodes} node(s) loaded "
              f"{group.seconds:.3f} s after load_on_ray was called (ray.init: {connected:.3f} s)", flush=True)
        if ns.report:
            with open(ns.report, "w") as fh:
                json.dump(report, fh, indent=1)
        status = _verify(group, args) if args.get("verify") else 0
        if ns.then:
            group.run(then_rank, ns.then, report)
        return status
    finally:
        group.shutdown()


def _verify(group: Any, args: dict) -> int:
    outcome = group.run(verify_rank, args)
    bad = {r: o["mismatches"] for r, o in enumerate(outcome) if o["mismatches"]}
    if bad:
        print(f"verify: FAILED, tensors differing from safetensors: {json.dumps(bad)[:2000]}", file=sys.stderr)
        return 1
    print(f"verify: {sum(o['verified'] for o in outcome)} owned tensors on {len(outcome)} ranks "
          f"identical to safetensors", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return run(ns)
    except WeightcastError as exc:
        print(f"weightcast.launch.ray_job: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
