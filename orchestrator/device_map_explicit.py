"""Explicit device maps: ``{module prefix: rank | "rank:device" | "cpu" | "disk"}``.

Called by :func:`weightcast.orchestrator.device_map.build_device_map` (coordinator or CLI) when the strategy
is a mapping or a JSON file holding one.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from weightcast.orchestrator.device_map_types import ClusterDeviceMap, Place, Placement, short_names as _names
from weightcast.orchestrator.errors import DeviceMapError

if TYPE_CHECKING:
    from weightcast.orchestrator.checkpoint import CheckpointIndex
    from weightcast.orchestrator.cluster import ClusterSpec

_PLACE_RE = re.compile(r"(0|[1-9][0-9]*):(cpu|disk|cuda:(?:0|[1-9][0-9]*))")


def explicit_map(index: "CheckpointIndex", cluster: "ClusterSpec", spec: Mapping[str, Any],
                 *, tied: tuple[tuple[str, ...], ...] = ()) -> ClusterDeviceMap:
    """``{module prefix: rank | "rank:device" | "cpu" | "disk"}``: the longest prefix (on ``.``
    boundaries; ``""`` matches everything) places each tensor. ``"cpu"``/``"disk"`` mean rank
    0's host; a bare rank means that rank's own device. Every tensor must be covered and every
    key must match some tensor (or a tied name absent from the checkpoint)."""
    table = {key: parse_place(value, cluster, where=f"device map key {key!r}")
             for key, value in _checked_keys(spec).items()}
    placements: dict[str, Placement] = {}
    used: set[str] = set()
    uncovered: list[str] = []
    for name in index.names:
        key = _longest_prefix(name, table)
        if key is None:
            uncovered.append(name)
        else:
            used.add(key)
            placements[name] = table[key]
    if uncovered:
        raise DeviceMapError(
            f"The device map leaves {len(uncovered)} tensor(s) without a placement",
            where="explicit device map", got=_names(uncovered),
            fix="add their module prefixes, or a catch-all key \"\"")
    known = {""} | {n.rsplit(".", i)[0] for n in index.names for i in range(n.count(".") + 1)}
    known |= {a.rsplit(".", i)[0] for g in tied for a in g for i in range(a.count(".") + 1)}
    unused = [k for k in table if k not in used and k not in known]
    if unused:
        raise DeviceMapError("Device map keys match no tensor of the checkpoint",
                             where="explicit device map", got=_names(sorted(unused)),
                             fix="check the spelling (prefixes end at a '.')")
    _check_tied_together(placements, tied, table)
    return ClusterDeviceMap(placements, "explicit", devices=cluster.devices, tied=tied)


def _checked_keys(spec: Mapping[str, Any]) -> dict[str, Any]:
    if not spec:
        raise DeviceMapError("An explicit device map is empty", where="explicit device map",
                             fix="give {module prefix: rank} entries, e.g. {\"\": 0}")
    for key in spec:
        if not isinstance(key, str):
            raise DeviceMapError("Device map keys are module prefixes (strings)",
                                 where="explicit device map", got=repr(key))
    return dict(spec)


def parse_place(value: Any, cluster: "ClusterSpec", *, where: str) -> Place:
    """One explicit-map value -> Place: ``3`` / ``"3"`` (rank 3's device), ``"3:cuda:3"``,
    ``"3:cpu"``, ``"3:disk"``, ``"cpu"`` / ``"disk"`` (rank 0's host)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DeviceMapError("Unknown placement", where=where,
                             expected='a rank, "rank:device", "cpu" or "disk"', got=repr(value))
    if isinstance(value, str) and value in ("cpu", "disk"):
        return Place(0, value)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        rank, device = value, None
    else:
        m = _PLACE_RE.fullmatch(value)
        if not m:
            raise DeviceMapError("Unknown placement", where=where, got=repr(value),
                                 expected='a rank, "rank:cuda:k", "rank:cpu", "rank:disk", '
                                          '"cpu" or "disk"')
        rank, device = int(m.group(1)), m.group(2)
    if not 0 <= rank < cluster.world_size:
        raise DeviceMapError("Placement names a rank outside the cluster", where=where,
                             expected=f"0..{cluster.world_size - 1}", got=rank)
    own = cluster.ranks[rank].device
    if device is not None and device.startswith("cuda:") and device != own:
        raise DeviceMapError("A rank only owns its own device", where=where,
                             expected=f"{rank}:{own}, {rank}:cpu or {rank}:disk",
                             got=repr(value))
    return Place(rank, device or own)


def _longest_prefix(name: str, table: Mapping[str, Any]) -> str | None:
    probe = name
    while True:
        if probe in table:
            return probe
        if not probe:
            return None
        probe = probe.rpartition(".")[0]


def _check_tied_together(placements: Mapping[str, Placement], tied: Iterable[Sequence[str]],
                         table: Mapping[str, Place]) -> None:
    for group in tied:
        # an alias absent from the checkpoint counts only when a key other than "" names it
        where = {n: placements[n] if n in placements else table.get(_longest_prefix(n, table) or "")
                 for n in group if n in placements or _longest_prefix(n, table)}
        spots = {p for p in where.values() if p is not None}
        if len(spots) > 1:
            raise DeviceMapError("Tied weights are placed apart", where=", ".join(group),
                                 got={n: str(p) for n, p in where.items()},
                                 fix="place them with the same rank and device")
