"""The device map's data types (a leaf module): ``Replicate``, ``Shard``, ``Place``,
``Placement``, ``ClusterDeviceMap``, and :func:`shard_bounds`.

See :mod:`weightcast.orchestrator.device_map` for their meaning. The strategies
(``device_map_auto``, ``_explicit``, ``_tp``, ``_fsdp``, ``key_mapping``) import them from here,
so none of them imports ``device_map`` back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

from weightcast.orchestrator.errors import DeviceMapError


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

    ``strategy`` records how it was made (``replicate``, ``auto``, ``balanced``, ``sequential``,
    ``tp``, ``explicit``); ``tp_plan`` keeps the name-pattern plan a ``tp`` map was built from
    (used to parallelize the model); ``devices`` is each rank's own device (its length is the
    world size; empty when unknown); ``tied`` lists groups of tensor names kept on one rank (a
    name may be absent from the checkpoint, e.g. ``lm_head.weight`` tied to the embeddings);
    ``no_split`` the module prefixes kept whole by ``auto``.
    """
    placements: dict[str, Placement]
    strategy: str = "explicit"
    tp_plan: tuple[tuple[str, str], ...] = ()
    devices: tuple[str, ...] = ()
    tied: tuple[tuple[str, ...], ...] = ()
    no_split: tuple[str, ...] = ()

    @property
    def world_size(self) -> int | None:
        return len(self.devices) or None

    def owners(self, name: str) -> tuple[int, ...]:
        p = self.placements[name]
        if isinstance(p, Replicate):
            return p.ranks
        if isinstance(p, Shard):
            return tuple(r for g in p.groups for r in g)
        return (p.rank,)


def short_names(names: Sequence[str], limit: int = 20) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def check_shardable(name: str, shape: Sequence[int], dim: int, parts: int) -> None:
    """Raise unless splitting ``shape[dim]`` in ``parts`` like ``torch.chunk`` gives every part a
    non-empty slice."""
    if dim >= len(shape):
        raise DeviceMapError(f"Cannot shard a {len(shape)}-d tensor along dim {dim}",
                             where=f"tensor {name!r}", got=f"shape {list(shape)}",
                             fix="replicate it, or shard a dimension it has")
    size = shape[dim]
    if shard_bounds(size, parts, parts - 1)[0] >= size:
        sizes = [b - a for a, b in (shard_bounds(size, parts, i) for i in range(parts))]
        raise DeviceMapError(
            f"Splitting dim {dim} of {size} rows {parts} ways leaves some ranks an empty slice",
            where=f"tensor {name!r}, shape {list(shape)}", got=f"torch.chunk sizes {sizes}",
            expected="every rank of a shard group gets at least one row",
            fix=f"use a tp size that divides {size}, or replicate this tensor in the tp plan")
