"""``torchrun ... -m weightcast.launch.torchrun SOURCE [load options] [--report FILE] [--then MODULE:FUNCTION]``.

Every rank started by torchrun runs :func:`main`: it loads ``SOURCE`` with
:func:`weightcast.workers.api.load_pretrained` (the process group comes from the torchrun environment;
node identity from ``WEIGHTCAST_NODE`` or the host name, gathered over the group), rank 0
prints the gathered report (and writes it with ``--report``), ``--verify`` compares every owned
tensor with ``safetensors`` bit for bit on every rank, and ``--then MODULE:FUNCTION`` calls the
user's ``FUNCTION(model, report)`` on every rank with the loaded model (or state dict).

Any script that calls ``load_pretrained`` under torchrun works the same way without this module;
it only adds the command line. Exit status: 0 on success, 2 on a load error (same message on
every rank), 1 when verification finds differing tensors.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, Callable

from weightcast.orchestrator.errors import ConfigError, WeightcastError


def build_parser() -> argparse.ArgumentParser:
    from weightcast.launch.cmd_load import add_load_options
    p = argparse.ArgumentParser(prog="python -m weightcast.launch.torchrun",
                                description="Load a checkpoint on every rank of a torchrun job.")
    p.add_argument("source", help="checkpoint directory, .safetensors file or hub repo id")
    p.add_argument("--report", default=None, help="rank 0 writes the gathered report JSON here")
    p.add_argument("--then", default=None, metavar="MODULE:FUNCTION",
                   help="call FUNCTION(model, report) on every rank after the load")
    p.add_argument("--quiet", action="store_true", help="do not print the report table")
    add_load_options(p)
    return p


def resolve_callable(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (imported on the calling rank)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError("Cannot read the function to call", where="--then", got=repr(spec),
                          expected="MODULE:FUNCTION, e.g. mypkg.eval:run")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("Cannot import the function to call", where="--then", got=f"{spec}: {exc}",
                          fix="check the spelling and that the module is importable on every node") from exc
    if not callable(fn):
        raise ConfigError("--then names something that is not callable", where="--then", got=repr(spec))
    return fn


def owned_state(result: Any) -> dict:
    """What a rank owns as ``name -> tensor`` (a state dict's real tensors; DTensors as local
    shards, with their ``slices``) for verification."""
    return result if isinstance(result, dict) else local_state(result)


def local_state(module: Any) -> dict:
    """``module.state_dict()`` with DTensors replaced by this rank's local shard; the returned
    dict carries ``slices`` (``name -> (dim, start, stop)``) for sharded entries."""
    from weightcast.workers.execute import OwnedTensors
    tensors, slices = {}, {}
    for name, t in module.state_dict().items():
        if t.is_meta:
            continue
        if hasattr(t, "to_local"):
            tensors[name], slices[name] = t.to_local(), _dtensor_slice(t)
        else:
            tensors[name] = t
    out = OwnedTensors(tensors)
    out.slices = slices
    return out


def _dtensor_slice(t: Any) -> tuple[int, int, int] | None:
    from torch.distributed.tensor import Shard
    from weightcast.orchestrator.device_map import shard_bounds
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            size = t.device_mesh.size(mesh_dim)
            index = t.device_mesh.get_local_rank(mesh_dim)
            start, stop = shard_bounds(t.shape[placement.dim], size, index)
            return placement.dim, start, stop
    return None


def verify(args: dict, result: Any) -> dict:
    """Every rank: bit-for-bit comparison of what it owns with safetensors (not collective)."""
    from weightcast.launch.jobs import verify_owned
    from weightcast.orchestrator.checkpoint import load_index
    root = (args.get("verify_root") or args["source"]).replace("{node}", node_name())
    tensors = owned_state(result)
    names = set(load_index(root).names)
    if not isinstance(result, dict):  # a model: tied aliases are not in the checkpoint
        kept = {k: v for k, v in tensors.items() if k in names}
        slices = tensors.slices
        tensors = type(tensors)(kept)
        tensors.slices = {k: v for k, v in slices.items() if k in names}
    return {"verified": len(tensors), "mismatches": verify_owned(root, tensors)}


def node_name() -> str:
    """This process's node, as the loader names it (``WEIGHTCAST_NODE``, else the host name)."""
    import socket
    return os.environ.get("WEIGHTCAST_NODE") or socket.gethostname()


def gather(value: dict) -> list[dict]:
    """Every rank's small JSON-able dict, in rank order (collective on the default group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    from datetime import timedelta
    out: list[Any] = [None] * dist.get_world_size()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=120))
    dist.all_gather_object(out, value, group=group)
    dist.destroy_process_group(group)
    return out


def print_report(report: dict, started: float, out=sys.stdout) -> None:
    """Rank 0: the per-rank table and the totals."""
    from weightcast.workers.report import LoadReport, format_table
    print(format_table([LoadReport(**r) for r in report["ranks"]]), file=out)
    print(f"storage bytes read: {report['total_read_bytes']:,} (checkpoint {report['checkpoint_bytes']:,}); "
          f"load {report['wall_seconds']:.3f} s; since process start {time.time() - started:.3f} s", file=out)
    out.flush()


def run(args: dict, then: str | None = None, report_path: str | None = None, quiet: bool = False) -> int:
    """Every rank: load, report (rank 0), verify, call ``then``. Returns the exit status."""
    from weightcast.launch.jobs import load_options
    from weightcast.workers.api import load_pretrained
    started = _process_start()
    fn = resolve_callable(then) if then else None  # fail before the collective load
    result, report = load_pretrained(args["source"], return_report=True, **load_options(args))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not quiet:
        print_report(report, started)
    if rank == 0 and report_path:
        with open(report_path, "w") as fh:
            json.dump(report, fh, indent=1)
    status = 0
    if args.get("verify"):
        status = _verify_all(args, result, rank)
    if fn is not None:
        fn(result, report)
    return status


def _verify_all(args: dict, result: Any, rank: int) -> int:
    outcome = gather(verify(args, result))
    bad = {r: o["mismatches"] for r, o in enumerate(outcome) if o["mismatches"]}
    if rank == 0:
        if bad:
            print(f"verify: FAILED, tensors differing from safetensors: {json.dumps(bad)[:2000]}", file=sys.stderr)
        else:
            total = sum(o["verified"] for o in outcome)
            print(f"verify: {total} owned tensors on {len(outcome)} ranks identical to safetensors")
        sys.stdout.flush()
    return 1 if bad else 0


def _process_start() -> float:
    """Wall-clock time this process started (for start-to-loaded figures)."""
    try:
        import psutil
        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable
        return time.time()


def _shutdown() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from weightcast.launch.cmd_load import check_cli_options, job_args
    from weightcast.launch.interrupts import describe, exit_status, interrupts_raise
    ns = build_parser().parse_args(argv)
    try:
        with interrupts_raise():  # torchrun's agent stops its workers with SIGTERM: clean up as on Ctrl-C
            check_cli_options(ns)
            return run(job_args(ns), ns.then, ns.report, ns.quiet)
    except WeightcastError as exc:
        print(f"rank {os.environ.get('RANK', '0')}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"rank {os.environ.get('RANK', '0')}: {describe(exc)}", file=sys.stderr)
        return exit_status(exc)
    finally:
        _shutdown()


if __name__ == "__main__":
    sys.exit(main())
