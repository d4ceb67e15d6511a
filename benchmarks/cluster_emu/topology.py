"""The emulated cluster's shape: names, addresses, paths and bandwidths. Pure data, no I/O.

Every other module of the emulation takes a :class:`Topology`; the harness builds one from its
flags (:func:`topology_from_args`) and the cluster YAML written for the cost model comes from it
(:func:`cluster_yaml`), so the emulated run and ``weightcast plan --simulate`` describe the same
cluster.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

DEFAULT_WORKDIR = "/tmp/weightcast-emu"
DEFAULT_SUBNET = "10.201.0.0/24"
GBIT = 1_000_000_000 / 8  # bytes per second in one Gbit/s
# Measured on this machine: a tbf-capped veth delivers ~95.5% of its rate as TCP goodput.
TBF_GOODPUT = 0.955
# gloo broadcast between the ranks of one node (loopback), measured: 2.9-3.8 GB/s.
INTRA_NODE_GBPS = 3.0


@dataclass(frozen=True, slots=True)
class Topology:
    """N nodes of K ranks on a private /24; links of ``link_gbit`` Gbit/s each direction;
    shared storage capped at ``storage_mbps`` MB/s in aggregate.

    ``prefix`` names every kernel object the emulation creates: namespaces ``<prefix>sw`` (the
    switch) and ``<prefix>n0..`` (the nodes); node k's ``eth0`` has address ``.k+1``.
    """
    nodes: int = 2
    ranks_per_node: int = 1
    link_gbit: float = 2.0
    storage_mbps: float = 250.0
    subnet: str = DEFAULT_SUBNET
    prefix: str = "wcemu-"
    workdir: str = DEFAULT_WORKDIR
    host_memory: str = "8GiB"
    rdzv_port: int = 29431
    read_ahead_kb: int = 1024  # the storage mount's client read-ahead (an NFS client's rsize)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 16:
            raise ValueError(f"nodes must be 1..16, got {self.nodes}")
        if not 1 <= self.ranks_per_node <= 8:
            raise ValueError(f"ranks_per_node must be 1..8, got {self.ranks_per_node}")
        if self.read_ahead_kb < 0:
            raise ValueError(f"read_ahead_kb must be >= 0, got {self.read_ahead_kb}")
        if self.link_gbit <= 0 or self.storage_mbps <= 0:
            raise ValueError("link_gbit and storage_mbps must be positive")
        net = ipaddress.ip_network(self.subnet)
        if not net.is_private or net.prefixlen > 28:
            raise ValueError(f"subnet must be a private network of at least 16 addresses, got {net}")
        if not os.path.isabs(self.workdir):
            raise ValueError(f"workdir must be an absolute path, got {self.workdir!r}")
        if len(self.prefix) + 4 > 15 or not self.prefix.replace("-", "").isalnum():
            raise ValueError(f"prefix must be short and alphanumeric (interface names), got {self.prefix!r}")

    # ---------------------------------------------------------------- names and addresses
    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}n{k}" for k in range(self.nodes))

    @property
    def bridge(self) -> str:
        return "br0"

    def port(self, k: int) -> str:
        """The switch-side end of node k's veth (lives in the switch namespace)."""
        return f"p{k}"

    def addr(self, k: int) -> str:
        net = ipaddress.ip_network(self.subnet)
        return str(net.network_address + 1 + k)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    # ---------------------------------------------------------------- paths
    @property
    def mountpoint(self) -> str:
        """Where the storage daemon mounts: ``MNT/<node>/...`` is node k's view of the files."""
        return os.path.join(self.workdir, "mnt")

    @property
    def ckpt_path(self) -> str:
        """The path every rank sees its node's view of the checkpoint at (bind-mounted per node)."""
        return os.path.join(self.workdir, "ckpt")

    @property
    def stats_path(self) -> str:
        """The storage daemon's counters (a virtual JSON file at the mount's root)."""
        return os.path.join(self.mountpoint, STATS_NAME)

    @property
    def state_path(self) -> str:
        return os.path.join(self.workdir, "state.json")

    def view(self, node: str) -> str:
        return os.path.join(self.mountpoint, node)

    # ---------------------------------------------------------------- bandwidths
    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbit * GBIT

    @property
    def storage_bytes_per_s(self) -> float:
        return self.storage_mbps * 1e6


STATS_NAME = ".emu-stats.json"


class EmulationError(RuntimeError):
    """The emulated cluster cannot be set up, run or torn down; the message says why and how to
    fix it."""


def cluster_yaml(topo: Topology, name: str | None = None) -> str:
    """The ``cluster_configs/`` YAML describing ``topo`` (node names = namespace names, the
    storage cap as both the per-node and the aggregate storage bandwidth, link goodput as the
    inter-node bandwidth)."""
    storage = topo.storage_mbps / 1000
    inter = topo.link_gbit * TBF_GOODPUT / 8
    name = name or f"emu-{topo.nodes}n"
    return "\n".join([
        f"# The emulated cluster of benchmarks/cluster_emu: {topo.nodes} network namespaces on one",
        "# machine, joined by a bridge over veth pairs shaped with tbf, reading one checkpoint",
        "# from a FUSE mount capped in aggregate (no client cache shared across nodes).",
        f"#   links: tbf {topo.link_gbit:g} Gbit/s per direction on both ends of each veth;",
        f"#          measured TCP goodput ~{TBF_GOODPUT:.1%} of the cap -> {inter:.3f} GB/s",
        "#          (no added delay: netem is not available on this kernel).",
        f"#   storage: token bucket of {topo.storage_mbps:g} MB/s over all nodes together.",
        "#   intra-node: gloo over loopback, measured 2.9-3.8 GB/s; memcpy and first touch",
        "#   measured on the development VM.",
        "# Written by: python -m benchmarks.cluster_emu.run configs --nodes N",
        f"name: {name}",
        "storage: shared",
        f"storage_gbps: {storage:g}",
        f"storage_total_gbps: {storage:g}",
        f"intra_node_gbps: {INTRA_NODE_GBPS:g}",
        f"inter_node_gbps: {inter:.4g}",
        "memcpy_gbps: 12.0",
        "first_touch_gbps: 2.2",
        "nodes:",
        f"  count: {topo.nodes}",
        f"  name_prefix: {topo.prefix}n",
        f"  ranks_per_node: {topo.ranks_per_node}",
        f"  host_memory: {topo.host_memory}",
        "",
    ])
