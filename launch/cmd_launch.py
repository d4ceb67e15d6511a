"""``weightcast launch --cluster cluster_configs/X.yaml SOURCE [load options]``: the torchrun
command of every node of a cluster YAML (printed), or, with ``--run``, this node's part executed.

One node: ``torchrun --standalone``. Several: torchrun's static rendezvous with its endpoint on
the first node (``--rdzv-endpoint HOST0:PORT``) and ``--node-rank`` per node, so ranks are
numbered node by node exactly in the YAML's order, whatever order the nodes start in; each node
gets ``--nproc-per-node`` from the YAML (heterogeneous nodes included) and ``WEIGHTCAST_NODE``
set to its YAML name. Every rank runs ``python -m weightcast.launch.torchrun SOURCE --cluster X.yaml
[load options]``, so the same YAML gives the load its storage locality and bandwidths (as it
does for :func:`weightcast.launch.ray.load_on_ray` and ``weightcast plan --cluster``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass

from weightcast.orchestrator.errors import ConfigError


@dataclass(frozen=True, slots=True)
class NodeCommand:
    """What one node runs: ``env`` added to its environment, then ``argv`` (``torchrun ...``)."""
    node: str
    node_rank: int
    nproc: int
    devices: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]

    def shell(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env), shlex.join(self.argv)])


def register(sub: argparse._SubParsersAction) -> None:
    from weightcast.launch.cmd_load import add_load_options
    p = sub.add_parser("launch", help="print (or --run for this node) the torchrun command of every node "
                                      "of a cluster YAML")
    p.add_argument("source", help="checkpoint directory (same path on every node; {node} is replaced by the "
                                  "node's name), .safetensors file or hub repo id")
    p.add_argument("--hosts", default=None, metavar="H0,H1,...",
                   help="address of each node, in the YAML's order (default: the node names)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--run", action="store_true", help="run this node's command (see --node / --node-rank)")
    p.add_argument("--node", default=None, help="this machine's node name (default: WEIGHTCAST_NODE, "
                                                "else the host name)")
    p.add_argument("--node-rank", type=int, default=None, help="this machine's position in the YAML")
    p.add_argument("--report", default=None, help="rank 0 writes the gathered report JSON here")
    p.add_argument("--then", default=None, metavar="MODULE:FUNCTION",
                   help="call FUNCTION(model, report) on every rank after the load")
    add_load_options(p)
    p.set_defaults(func=run_launch)


def load_argv(ns: argparse.Namespace) -> list[str]:
    """The load options of ``ns`` that differ from their defaults, as command-line flags for
    ``weightcast.launch.torchrun`` (``--cluster`` excluded: the caller adds it)."""
    from weightcast.launch.cmd_load import add_load_options
    parser = argparse.ArgumentParser(add_help=False)
    add_load_options(parser)
    out: list[str] = []
    for key, default in vars(parser.parse_args([])).items():
        value = getattr(ns, key, default)
        if key == "cluster" or value == default:
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def node_commands(cluster_path: str, source: str, options: list[str], hosts: list[str] | None = None,
                  port: int = 29500) -> list[NodeCommand]:
    """One :class:`NodeCommand` per node of the cluster YAML, in its order (pure: reads the YAML)."""
    from weightcast.orchestrator.cluster import load_cluster
    spec = load_cluster(cluster_path)
    nodes = list(spec.nodes)
    hosts = hosts or nodes
    if len(hosts) != len(nodes):
        raise ConfigError("--hosts needs one address per node", where=f"cluster {spec.name!r}",
                          expected=f"{len(nodes)} addresses ({', '.join(nodes)})", got=f"{len(hosts)}: {hosts}")
    worker = ["-m", "weightcast.launch.torchrun", source, "--cluster", cluster_path, *options]
    out = []
    for i, node in enumerate(nodes):
        ranks = spec.ranks_on(node)
        if len(nodes) == 1:
            rdzv = ["--standalone", "--nnodes", "1"]
        else:
            rdzv = ["--nnodes", str(len(nodes)), "--node-rank", str(i), "--rdzv-backend", "static",
                    "--rdzv-endpoint", f"{hosts[0]}:{port}"]
        argv = ("torchrun", *rdzv, "--nproc-per-node", str(len(ranks)), *worker)
        out.append(NodeCommand(node, i, len(ranks), tuple(spec.ranks[r].device for r in ranks),
                               (("WEIGHTCAST_NODE", node),), argv))
    return out


def local_node(commands: list[NodeCommand], hosts: list[str] | None, node: str | None, node_rank: int | None
               ) -> NodeCommand:
    """This machine's command: the only node, or by --node-rank, --node, WEIGHTCAST_NODE or the
    host name."""
    if node_rank is None and node is None and len(commands) == 1:
        return commands[0]
    if node_rank is not None:
        if not 0 <= node_rank < len(commands):
            raise ConfigError("--node-rank is outside the cluster", expected=f"0..{len(commands) - 1}", got=node_rank)
        return commands[node_rank]
    names = [node] if node else [os.environ.get("WEIGHTCAST_NODE"), socket.gethostname(), socket.getfqdn()]
    for name in filter(None, names):
        for i, cmd in enumerate(commands):
            if name == cmd.node or (hosts and name == hosts[i]):
                return cmd
    raise ConfigError("Cannot tell which node of the cluster this machine is", where="weightcast launch --run",
                      expected=f"one of {[c.node for c in commands]}", got=f"{[n for n in names if n]}",
                      fix="pass --node NAME or --node-rank K")


def run_launch(args: argparse.Namespace) -> int:
    if not args.cluster:
        raise ConfigError("weightcast launch needs a cluster YAML", where="--cluster",
                          fix="pass --cluster cluster_configs/<name>.yaml")
    hosts = args.hosts.split(",") if args.hosts else None
    extra = [*(["--report", args.report] if args.report else []), *(["--then", args.then] if args.then else [])]
    commands = node_commands(args.cluster, args.source, load_argv(args) + extra, hosts, args.port)
    if not args.run:
        print(f"# {len(commands)} node(s); run each line on its node, from the repository root "
              f"(or with weightcast installed), with {args.cluster} present there")
        for c in commands:
            print(f"# node {c.node} (node rank {c.node_rank} of {len(commands)}): {c.nproc} ranks on "
                  f"{', '.join(dict.fromkeys(c.devices))}")
            print(c.shell())
        return 0
    mine = local_node(commands, hosts, args.node, args.node_rank)
    argv = [sys.executable, "-m", "torch.distributed.run", *mine.argv[1:]]
    print(f"# node {mine.node}: {mine.shell()}", flush=True)
    return subprocess.run(argv, env=dict(os.environ, **dict(mine.env))).returncode
