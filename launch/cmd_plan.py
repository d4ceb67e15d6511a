"""``weightcast plan SOURCE``: build (and optionally simulate) the load plan of a checkpoint on a
cluster, without loading anything.

The cluster comes from ``--cluster FILE.yaml`` or ``--nodes N --gpus-per-node G`` (or
``--cpus-per-node C``); the device map from ``--device-map replicate|auto|tp|FILE.json``. Prints
a per-rank table (node, device, bytes read, received, owned, tensors owned) and totals: storage
bytes read vs checkpoint bytes vs naive (every rank reads everything), or with ``--json`` one
object. ``--simulate`` adds the cost model's prediction next to its lower bound. Bad input
raises a WeightcastError, printed by ``weightcast.launch.cli`` without a traceback (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from weightcast.launch.cli_args import add_storage_option, human_bytes, parse_storage_options
from weightcast.orchestrator.errors import ConfigError

MAX_TABLE_ROWS = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="plan (and simulate) a load on a cluster",
                              description="Plan which rank reads which bytes of a checkpoint and "
                              "how they move, for a cluster and a device map.")
    p.add_argument("source", metavar="SOURCE", help="directory, .safetensors file, org/name or s3://bucket/prefix")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="FILE.yaml",
                       help="cluster spec: a YAML file or a shipped name (e.g. 16x8-h100)")
    where.add_argument("--nodes", type=int, help="N identical nodes (with --gpus-per-node or "
                       "--cpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, help="GPU ranks per node (cuda:0..G-1)")
    p.add_argument("--cpus-per-node", type=int, help="CPU ranks per node")
    p.add_argument("--storage", choices=["shared", "node-local"],
                   help="override the cluster's storage locality")
    p.add_argument("--device-map", default="auto", help="replicate | auto | tp | FILE.json "
                   "(default auto)")
    p.add_argument("--tp-size", type=int, help="ranks per tensor-parallel group (default: ranks "
                   "per node)")
    p.add_argument("--max-memory", metavar="SIZE|RANK=SIZE,...",
                   help="per-rank memory budget of auto, e.g. 70GiB or 0=20GB,1=30GB,cpu=100GB")
    p.add_argument("--transport", default="auto", choices=["auto", "collective", "node-shared"],
                   help="auto: node-shared for CPU ranks, collective for GPUs")
    p.add_argument("--chunk-size", default="64MiB", help="largest chunk read or moved at once")
    p.add_argument("--bucket-size", default="256MiB", help="largest transfer bucket")
    p.add_argument("--gap-size", default="0", help="coalesce a rank's reads across such gaps")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--simulate", action="store_true", help="predict the load time (cost model)")
    p.add_argument("--save-device-map", metavar="FILE.json", help="write the device map as JSON")
    p.add_argument("--save-plan", metavar="FILE.json", help="write the plan as JSON")
    p.add_argument("--revision", help="branch, tag or commit (HF repos)")
    p.add_argument("--cache-dir", help="HF cache directory (default: huggingface_hub's)")
    p.add_argument("--local-files-only", action="store_true", help="never touch the network")
    add_storage_option(p, "s3:// sources: a storage_options entry (e.g. endpoint_url=..., region_name=...)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accept a config.json that asks for remote code (as a load with trust_remote_code=True)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle weights (they have no plan)")
    p.set_defaults(func=run_plan)


def plan_defaults() -> dict[str, Any]:
    """Every option of ``plan`` at its default (callers set ``source`` and what they need)."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return vars(parser.parse_args(["plan", "SOURCE"]))


def build_cluster(args: argparse.Namespace) -> Any:
    """The ClusterSpec the options describe."""
    from dataclasses import replace

    from weightcast.orchestrator.cluster import cluster_from_flags, load_cluster
    gpus, cpus = getattr(args, "gpus_per_node", None), getattr(args, "cpus_per_node", None)
    if args.cluster:
        if gpus or cpus:
            raise ConfigError("--cluster and --gpus-per-node/--cpus-per-node exclude each other",
                              fix="describe the nodes in the YAML file, or use --nodes")
        cluster = load_cluster(args.cluster)
        return replace(cluster, storage=args.storage) if args.storage else cluster
    if bool(gpus) == bool(cpus):
        raise ConfigError("the cluster is not described",
                          expected="--cluster FILE.yaml, or --nodes N with exactly one of "
                          "--gpus-per-node G / --cpus-per-node C",
                          got=f"--nodes {args.nodes}, --gpus-per-node {gpus}, --cpus-per-node {cpus}")
    return cluster_from_flags(args.nodes or 1, gpus or cpus, cpu=bool(cpus),
                              storage=args.storage or "shared")


def parse_max_memory(text: str | None) -> dict[Any, str] | None:
    """``70GiB`` (every rank) or ``0=20GB,1=30GB,cpu=100GB`` -> build_device_map's max_memory."""
    if not text:
        return None
    if "=" not in text:
        return {"*": text}
    out: dict[Any, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError("bad --max-memory entry", got=repr(part),
                              expected="SIZE or RANK=SIZE,...,cpu=SIZE")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The load's prepare step (:func:`weightcast.orchestrator.prepare.prepare`, the same a real
    load runs on rank 0: it refuses what a load refuses) on the cluster the options describe;
    returns the pieces and ``plan_seconds``, the whole step's wall time (resolving the source,
    the checks, the model's own tp plan when there is one, the device map and the plan)."""
    from weightcast.orchestrator.cluster import parse_bytes
    from weightcast.orchestrator.prepare import prepare_with_index
    from weightcast.orchestrator.request import LoadRequest
    from weightcast.workers.prepare_hooks import WorkerHooks
    cluster = build_cluster(args)
    max_memory = parse_max_memory(args.max_memory)
    if max_memory and "*" in max_memory:
        max_memory = {r: max_memory["*"] for r in range(cluster.world_size)}
    request = LoadRequest(args.source, revision=args.revision, cache_dir=args.cache_dir,
                          storage_options=parse_storage_options(getattr(args, "storage_option", None)),
                          local_files_only=True if args.local_files_only else None,
                          device_map=args.device_map, max_memory=max_memory, tp_size=args.tp_size,
                          transport=args.transport, trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
                          allow_pickle=bool(getattr(args, "allow_pickle", False)),
                          chunk_bytes=parse_bytes(args.chunk_size, where="--chunk-size"),
                          bucket_bytes=parse_bytes(args.bucket_size, where="--bucket-size"))
    start = time.perf_counter()
    order, index = prepare_with_index(request, cluster, WorkerHooks(),
                                      gap_bytes=parse_bytes(args.gap_size, where="--gap-size"))
    seconds = time.perf_counter() - start
    if order.plan is None:
        raise ConfigError("A pickle checkpoint has no load plan", where=order.root,
                          expected="safetensors weights", got=f"pickle files {list(order.files)[:4]}",
                          fix="convert the checkpoint to safetensors (weightcast save) to plan its load")
    return {"index": index, "cluster": cluster, "device_map": order.device_map, "plan": order.plan,
            "order": order, "plan_seconds": seconds}


def summary(made: dict[str, Any], simulate: bool) -> dict[str, Any]:
    """The ``--json`` object."""
    from weightcast.orchestrator.planner import (owned_table, plan_to_json, rank_owned_bytes,
                                      rank_read_bytes, rank_recv_bytes)
    index, cluster, plan = made["index"], made["cluster"], made["plan"]
    lengths = {t.name: t.length for t in index.tensors}
    read, recv = rank_read_bytes(plan), rank_recv_bytes(plan)
    owned = rank_owned_bytes(plan, lengths)
    tensors = [0] * plan.world_size
    for row in owned_table(plan).rows:
        for r in row.ranks:
            tensors[r] += 1
    ranks = [{"rank": r, "node": s.node, "device": s.device, "read_bytes": read[r],
              "recv_bytes": recv[r], "owned_bytes": owned[r], "tensors_owned": tensors[r]}
             for r, s in enumerate(cluster.ranks)]
    mean = sum(read) / max(1, len(read))
    out: dict[str, Any] = {
        "source": index.root, "cluster": cluster.name, "world_size": plan.world_size,
        "nodes": len(plan.nodes), "storage": plan.storage, "transport": plan.options.transport,
        "device_map": made["device_map"].strategy, "checkpoint_bytes": plan.checkpoint_bytes,
        "needed_bytes": plan.needed_bytes, "total_read_bytes": sum(read),
        "naive_read_bytes": plan.checkpoint_bytes * plan.world_size,
        "max_mean_read": max(read) / mean if mean else 0.0, "chunks": len(plan.chunks),
        "reads": len(plan.reads), "transfers": len(plan.transfers),
        "plan_seconds": round(made["plan_seconds"], 4),
        "plan_json_bytes": len(plan_to_json(plan)), "ranks": ranks}
    if simulate:
        from weightcast.orchestrator.cost import predict
        p = predict(plan, cluster)
        out.update(predicted_seconds=p.total_seconds, lower_bound_seconds=p.lower_bound_seconds,
                   bound_by=p.bound_by, phases=dict(p.phases))
        for entry, seconds in zip(ranks, p.per_rank_seconds):
            entry["predicted_seconds"] = seconds
    return out


def run_plan(args: argparse.Namespace) -> int:
    made = make_plan(args)
    if getattr(args, "save_device_map", None):
        from weightcast.orchestrator.device_map import device_map_to_json
        _write(args.save_device_map, device_map_to_json(made["device_map"]).encode())
    if getattr(args, "save_plan", None):
        from weightcast.orchestrator.planner import plan_to_json
        _write(args.save_plan, plan_to_json(made["plan"]))
    out = summary(made, args.simulate)
    if args.json:
        json.dump(out, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        print_summary(out)
    return 0


def _write(path: str, data: bytes) -> None:
    import os
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError("cannot write the output file", where=path, got=str(exc)) from None


def print_summary(s: dict[str, Any]) -> None:
    hb = human_bytes  # the table is wide: a short name
    out = sys.stdout.write
    out(f"checkpoint: {s['source']}\n")
    out(f"cluster: {s['cluster']}: {s['world_size']} ranks on {s['nodes']} node(s), "
        f"{s['storage']} storage; device map: {s['device_map']}; transport: {s['transport']}\n")
    sim = "predicted_seconds" in s
    out(f"{'rank':>5} {'node':<12} {'device':<8} {'read':>10} {'received':>10} {'owned':>10} "
        f"{'tensors':>7}{'  predicted' if sim else ''}\n")
    for e in s["ranks"][:MAX_TABLE_ROWS]:
        predicted = f"  {e['predicted_seconds']:9.3f} s" if sim else ""
        out(f"{e['rank']:>5} {e['node'][:12]:<12} {e['device']:<8} {hb(e['read_bytes']):>10} "
            f"{hb(e['recv_bytes']):>10} {hb(e['owned_bytes']):>10} {e['tensors_owned']:>7}"
            f"{predicted}\n")
    if len(s["ranks"]) > MAX_TABLE_ROWS:
        out(f"  ... {len(s['ranks']) - MAX_TABLE_ROWS} more ranks (--json lists every rank)\n")
    ck, total, naive = s["checkpoint_bytes"], s["total_read_bytes"], s["naive_read_bytes"]
    out(f"storage bytes read: {hb(total)} = {total / max(ck, 1):.3f} x checkpoint ({hb(ck)}); "
        f"needed {hb(s['needed_bytes'])}; naive (every rank reads everything) {hb(naive)} "
        f"= {naive / max(total, 1):.1f} x more\n")
    out(f"read balance max/mean {s['max_mean_read']:.3f}; {s['chunks']} chunks, {s['reads']} "
        f"reads, {s['transfers']} transfers; prepared (resolve, checks, map, plan) in "
        f"{s['plan_seconds'] * 1000:.0f} ms, "
        f"plan JSON {hb(s['plan_json_bytes'])}\n")
    if sim:
        phases = ", ".join(f"{k} {v:.3f} s" for k, v in s["phases"].items())
        out(f"predicted load time: {s['predicted_seconds']:.3f} s ({phases}); lower bound "
            f"{s['lower_bound_seconds']:.3f} s ({s['bound_by']})\n")
