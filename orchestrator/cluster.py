"""ClusterSpec: nodes, ranks, devices, memory, storage locality and bandwidths.

Built from a YAML file (``cluster_configs/``), from flags (``--nodes N --gpus-per-node G``) or, at
run time, from facts the workers gather from every rank (host name, local rank, device, memory).
This module only turns such facts into a spec; it never talks to other processes.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RankSpec:
    rank: int
    local_rank: int
    node: str
    device: str  # "cpu" or "cuda:k" (k = the local device index, never the global rank)
    device_memory: int  # bytes usable on `device` (host memory share for cpu)
    host_memory: int  # bytes of host memory on the node


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The cluster a load runs on.

    ``storage`` is ``"shared"`` (every node reads the same files; each byte is read once per
    cluster) or ``"node-local"`` (each node has its own copy; each byte is read once per node).
    Bandwidths are in GB/s and only feed the cost model.
    """
    ranks: tuple[RankSpec, ...]
    storage: str = "shared"
    storage_gbps: float = 2.0  # read bandwidth of one node from storage
    storage_total_gbps: float | None = None  # aggregate cap of shared storage (None: no cap)
    intra_node_gbps: float = 10.0
    inter_node_gbps: float = 1.25
    memcpy_gbps: float = 12.0
    first_touch_gbps: float = 2.2
    name: str = "cluster"

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names in order of their lowest rank."""
        seen: dict[str, None] = {}
        for r in self.ranks:
            seen.setdefault(r.node, None)
        return tuple(seen)

    def node_of(self, rank: int) -> str:
        return self.ranks[rank].node

    def ranks_on(self, node: str) -> tuple[int, ...]:
        return tuple(r.rank for r in self.ranks if r.node == node)
