"""The cluster-wide device map: for every tensor a Placement.

- ``Replicate(ranks)``: every listed rank gets the whole tensor (data parallel).
- ``Shard(dim, groups)``: inside each group, position i gets the i-th ``torch.chunk``-style slice
  along ``dim`` (tensor parallel); several groups are replicas of the same sharding.
- ``Place(rank, device)``: one rank owns the whole tensor on ``device`` (``cuda:k``, ``cpu`` or
  ``disk``): an HF-style ``device_map`` spread over the cluster.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True, slots=True)
class Replicate:
    ranks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Shard:
    dim: int
    groups: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class Place:
    rank: int
    device: str = "cpu"


Placement = Union[Replicate, Shard, Place]


def shard_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of chunk ``index`` of ``size`` rows split in ``parts`` like ``torch.chunk``
    (chunks of ceil(size/parts); trailing chunks may be short or empty)."""
    step = -(-size // parts) if parts else 0
    start = min(size, index * step)
    return start, min(size, start + step)


@dataclass(frozen=True, slots=True)
class ClusterDeviceMap:
    """Placement of every tensor of a checkpoint over the ranks of a cluster.

    ``strategy`` records how it was made (``replicate``, ``auto``, ``tp``, ``explicit``);
    ``tp_plan`` keeps the name-pattern plan a ``tp`` map was built from (used to parallelize the
    model), ``no_split`` the module prefixes kept whole by ``auto``.
    """
    placements: dict[str, Placement]
    strategy: str = "explicit"
    tp_plan: tuple[tuple[str, str], ...] = ()

    def owners(self, name: str) -> tuple[int, ...]:
        p = self.placements[name]
        if isinstance(p, Replicate):
            return p.ranks
        if isinstance(p, Shard):
            return tuple(r for g in p.groups for r in g)
        return (p.rank,)
