"""``fsdp`` device maps: every tensor split along dim 0 over the data-parallel ranks, as FSDP2's
``fully_shard`` splits it (HSDP: sharded inside a node, replicated across nodes).

Called by :func:`weightcast.orchestrator.device_map.build_device_map` on the coordinator or in the CLI.

``fully_shard`` cuts each parameter with ``torch.chunk`` semantics on dim 0 and pads with empty
chunks (``torch.distributed.fsdp._fully_shard._fsdp_common._chunk_with_empty``): rank i of the
shard group holds rows ``shard_bounds(rows, n, i)`` (:func:`fsdp_bounds`), possibly none. The
planner reads a dim-0 slice as one contiguous byte range, so each rank reads only its rows. A
tensor whose split would leave some rank without rows (fewer rows than ``ceil``-sized chunks
cover, e.g. a 1-row tensor on 2 ranks) or a 0-d tensor is ``Replicate``-d instead: still read
once per cluster, and materialization keeps only the rank's ``torch.chunk`` rows of it.

Shard groups: one per node when every node has the same number of ranks and there are several
nodes (HSDP: a 2-d mesh ``(replicate, shard)``), else one group of every rank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from weightcast.orchestrator.device_map_types import ClusterDeviceMap, Placement, Replicate, Shard, shard_bounds

if TYPE_CHECKING:
    from weightcast.orchestrator.checkpoint import CheckpointIndex
    from weightcast.orchestrator.cluster import ClusterSpec


def fsdp_bounds(rows: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of the rows ``fully_shard`` gives shard rank ``index`` of ``parts``
    (``torch.chunk`` chunks, trailing ranks empty when fewer chunks than ranks)."""
    return shard_bounds(rows, parts, index)


def fsdp_groups(cluster: "ClusterSpec") -> tuple[tuple[int, ...], ...]:
    """Shard groups: the ranks of each node (ordered by local rank) when there are several nodes
    of equal size, else one group of every rank."""
    nodes = cluster.nodes
    sizes = {cluster.local_world_size(n) for n in nodes}
    if len(nodes) > 1 and len(sizes) == 1 and sizes.pop() > 1:
        return tuple(cluster.ranks_on(n) for n in nodes)
    return (tuple(range(cluster.world_size)),)


def evenly_shardable(shape: tuple[int, ...], parts: int) -> bool:
    """True when splitting dim 0 of ``shape`` in ``parts`` gives every part at least one row."""
    return bool(shape) and shape[0] > 0 and fsdp_bounds(shape[0], parts, parts - 1)[0] < shape[0]


def fsdp_map(index: "CheckpointIndex", cluster: "ClusterSpec",
             tied: tuple[tuple[str, ...], ...]) -> ClusterDeviceMap:
    """Placements of an ``fsdp`` map (see the module docstring)."""
    groups = fsdp_groups(cluster)
    parts = len(groups[0])
    everyone = Replicate(tuple(range(cluster.world_size)))
    shard = Shard(0, groups)
    placements: dict[str, Placement] = {}
    for name in index.names:
        shape = tuple(index.tensor(name).shape)
        placements[name] = shard if parts > 1 and evenly_shardable(shape, parts) else everyone
    return ClusterDeviceMap(placements, "fsdp", devices=cluster.devices, tied=tied)
