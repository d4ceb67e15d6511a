"""Two emulated nodes with node-local storage on one machine: each node reads the checkpoint once.

    python -m examples.two_nodes_local_storage demo_checkpoint --workdir /tmp/wc-two-nodes

Each "node" (``WEIGHTCAST_NODE=n0`` / ``n1``, 2 ranks each, started by
:func:`weightcast.launch.local.spawn`) gets its own copy of the checkpoint in its own directory
(``WORKDIR/n0/checkpoint``, ``WORKDIR/n1/checkpoint``), as machines with local disks would. The
source is given as ``WORKDIR/{node}/checkpoint``: every node resolves its own copy. The cluster
YAML says ``storage: node-local``, so the plan has every byte a node needs read once on that
node, from its own copy, and nothing sent between nodes. The figures printed are the loader's
report: bytes each rank read from storage, summed per node.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import weightcast as wc  # importing weightcast does not import torch

NODES = ("n0", "n1")
RANKS_PER_NODE = 2


def node_copies(source: str, workdir: str, nodes: tuple[str, ...] = NODES) -> dict[str, str]:
    """One copy of the checkpoint's files per node (``workdir/<node>/checkpoint``), with the
    original modification times (the plan checks them)."""
    out = {}
    for node in nodes:
        dest = os.path.join(workdir, node, "checkpoint")
        os.makedirs(dest, exist_ok=True)
        for name in sorted(os.listdir(source)):
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(dest, name))
        out[node] = os.path.abspath(dest)
    return out


def write_cluster_yaml(path: str, nodes: tuple[str, ...] = NODES, ranks_per_node: int = RANKS_PER_NODE) -> str:
    """A cluster spec: the emulated nodes, CPU ranks, ``storage: node-local``."""
    lines = ["name: two-nodes-local-storage", "storage: node-local", "nodes:"]
    for node in nodes:
        lines += [f"  - name: {node}", f"    ranks: {ranks_per_node}", "    host_memory: 8GiB"]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def rank_job(args: dict) -> dict:
    """On every rank (launch.local.spawn): load the node's copy, verify it against that copy,
    return this rank's part of the report."""
    from weightcast.launch.jobs import verify_owned  # the check `weightcast load --verify` runs
    node = os.environ["WEIGHTCAST_NODE"]
    tensors, report = wc.load_pretrained(args["source"], model=None, cluster=args["cluster"], return_report=True,
                                         transport=args.get("transport", "auto"),
                                         timeout=args.get("timeout", 120))
    mine = report["ranks"][int(os.environ["RANK"])]
    out = {"rank": mine["rank"], "node": node, "read_bytes": mine["read_bytes"],
           "cross_node_recv": mine["cross_node_recv"], "owned": len(tensors),
           "mismatches": verify_owned(args["source"].replace("{node}", node), tensors),
           "checkpoint_bytes": report["checkpoint_bytes"]}
    if args.get("compare_with"):  # another copy: which tensors differ from it
        out["differs_from_other"] = verify_owned(args["compare_with"], tensors)
    return out


def run(source: str, workdir: str, transport: str = "auto", timeout: float = 120.0, copy: bool = True,
        compare_with: str | None = None) -> dict:
    """Copy (unless ``copy`` is False: the copies exist), write the YAML, start 2 x 2 ranks;
    return per-node read bytes and the rank results (``compare_with``: each rank also lists the
    tensors that differ from that directory's copy)."""
    from weightcast.launch.local import spawn
    workdir = os.path.abspath(workdir)
    if copy:
        node_copies(source, workdir)
    cluster = write_cluster_yaml(os.path.join(workdir, "two-nodes.yaml"))
    nodes = [n for n in NODES for _ in range(RANKS_PER_NODE)]
    args = {"source": os.path.join(workdir, "{node}", "checkpoint"), "cluster": cluster, "transport": transport,
            "timeout": timeout, "compare_with": compare_with}
    results = [r.value for r in spawn(len(nodes), "examples.two_nodes_local_storage:rank_job", args,
                                      nodes=nodes, timeout=timeout + 60)]
    per_node = {n: sum(r["read_bytes"] for r in results if r["node"] == n) for n in NODES}
    return {"per_node_read": per_node, "checkpoint_bytes": results[0]["checkpoint_bytes"], "ranks": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint directory")
    p.add_argument("--workdir", default="two_nodes_local_storage")
    p.add_argument("--transport", default="auto", choices=["auto", "node-shared", "collective"])
    args = p.parse_args(argv)
    found = run(args.source, args.workdir, args.transport)
    for r in found["ranks"]:
        print(f"rank {r['rank']} on {r['node']}: read {r['read_bytes']:,} bytes from storage, received "
              f"{r['cross_node_recv']:,} from the other node; {r['owned']} tensors, "
              f"{len(r['mismatches'])} differing from the node's copy")
    total = found["checkpoint_bytes"]
    for node, read in found["per_node_read"].items():
        print(f"node {node}: its storage served {read:,} bytes = {read / total:.2f} x the checkpoint")
    ok = all(v == total for v in found["per_node_read"].values()) and not any(r["mismatches"] for r in found["ranks"])
    print(json.dumps({"each_node_read_once": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
