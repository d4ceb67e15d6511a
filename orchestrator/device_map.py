"""The cluster-wide device map: for every tensor a Placement.

- ``Replicate(ranks)``: every listed rank gets the whole tensor (data parallel).
- ``Shard(dim, groups)``: inside each group, position i gets the i-th ``torch.chunk``-style slice
  along ``dim`` (tensor parallel); several groups are replicas of the same sharding.
- ``Place(rank, device)``: one rank owns the whole tensor on ``device`` (``cuda:k``, ``cpu`` or
  ``disk``): an HF-style ``device_map`` spread over the cluster.

:func:`build_device_map` is called by the coordinator (rank 0) and the ``plan`` CLI, never
collectively; the map then travels to every rank as JSON (:func:`device_map_to_json`), where
:func:`hf_device_map` gives each rank its transformers-style ``device_map``. Strategies:
``replicate``, ``auto`` / ``balanced`` / ``sequential`` (:mod:`weightcast.orchestrator.device_map_auto`),
``tp`` (:mod:`weightcast.orchestrator.device_map_tp`), ``fsdp`` (dim-0 shards as FSDP2 cuts them,
:mod:`weightcast.orchestrator.device_map_fsdp`), an explicit ``{module prefix: placement}`` dict, a
JSON file, or an existing :class:`ClusterDeviceMap`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from weightcast.orchestrator.device_map_types import (ClusterDeviceMap, Place, Placement, Replicate,  # noqa: F401
                                                      Shard, check_shardable, shard_bounds,
                                                      short_names as _names)
from weightcast.orchestrator.errors import DeviceMapError

if TYPE_CHECKING:
    from weightcast.orchestrator.checkpoint import CheckpointIndex
    from weightcast.orchestrator.cluster import ClusterSpec

AUTO_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
STRATEGIES = ("replicate", *AUTO_STRATEGIES, "tp", "fsdp")
JSON_FORMAT = "weightcast.device_map"
_DEVICE_RE = re.compile(r"cpu|disk|cuda:(0|[1-9][0-9]*)")


# ---------------------------------------------------------------- building

def build_device_map(index: "CheckpointIndex", cluster: "ClusterSpec",
                     strategy: "str | Mapping[str, Any] | ClusterDeviceMap | os.PathLike" = "auto",
                     *, max_memory: Mapping[Any, Any] | None = None, tp_size: int | None = None,
                     tp_plan: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
                     no_split_module_classes: Sequence[str] | None = None,
                     no_split_prefixes: Sequence[str] | None = None,
                     tied: Sequence[Sequence[str]] | None = None,
                     config: Mapping[str, Any] | None = None,
                     key_rules: Mapping[str, Any] | None = None) -> ClusterDeviceMap:
    """Place every tensor of ``index`` on the ranks of ``cluster``.

    Called on the coordinator (rank 0) or by the CLI; pure (reads a JSON file only when
    ``strategy`` is a path). Raises :class:`DeviceMapError` for an unknown strategy, options that
    do not apply to it, a map that misses tensors or names ranks outside the cluster.
    """
    from weightcast.orchestrator import device_map_auto, device_map_explicit, device_map_tp

    _check_options(strategy, max_memory=max_memory, tp_size=tp_size, tp_plan=tp_plan,
                   no_split=no_split_module_classes or no_split_prefixes)
    tied_groups = device_map_auto.tied_groups(index, tied, config)
    if isinstance(strategy, ClusterDeviceMap):
        dm = strategy
    elif isinstance(strategy, Mapping):
        dm = device_map_explicit.explicit_map(index, cluster, strategy, tied=tied_groups)
    elif isinstance(strategy, os.PathLike) or (isinstance(strategy, str)
                                               and strategy not in STRATEGIES):
        dm = _from_file(index, cluster, strategy, tied_groups)
    elif strategy == "replicate":
        everyone = Replicate(tuple(range(cluster.world_size)))
        dm = ClusterDeviceMap({n: everyone for n in index.names}, "replicate", tied=tied_groups)
    elif strategy == "fsdp":
        from weightcast.orchestrator.device_map_fsdp import fsdp_map
        dm = fsdp_map(index, cluster, tied_groups)
    elif strategy == "tp":
        dm = device_map_tp.tp_map(index, cluster, tp_size=tp_size, tp_plan=tp_plan,
                                  config=config, tied=tied_groups, key_rules=key_rules)
    else:
        dm = device_map_auto.auto_map(
            index, cluster, strategy, max_memory=max_memory, tied=tied_groups,
            no_split_module_classes=no_split_module_classes,
            no_split_prefixes=no_split_prefixes, config=config)
    if not dm.devices:
        dm = replace(dm, devices=cluster.devices)
    validate_device_map(dm, index=index, cluster=cluster)
    return dm


def _check_options(strategy: Any, *, max_memory: Any, tp_size: Any, tp_plan: Any,
                   no_split: Any) -> None:
    name = strategy if isinstance(strategy, str) else "explicit"
    if (tp_size is not None or tp_plan is not None) and name != "tp":
        raise DeviceMapError("tp_size / tp_plan only apply to the 'tp' strategy",
                             where=f"strategy {name!r}", fix="drop them or use strategy 'tp'")
    if (max_memory is not None or no_split) and name not in AUTO_STRATEGIES:
        raise DeviceMapError("max_memory / no-split options only apply to 'auto'",
                             where=f"strategy {name!r}", fix="drop them or use strategy 'auto'")


def _from_file(index: "CheckpointIndex", cluster: "ClusterSpec", path: Any,
               tied: tuple[tuple[str, ...], ...]) -> ClusterDeviceMap:
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise DeviceMapError("Unknown device map strategy and no such JSON file", where=where,
                             expected="one of " + ", ".join(STRATEGIES) + ", or a JSON file")
    with open(where, encoding="utf-8") as f:
        text = f.read()
    data = _parse_json(text, where)
    if isinstance(data, dict) and data.get("format") == JSON_FORMAT:
        return device_map_from_json(text)
    if not isinstance(data, dict):
        raise DeviceMapError("A device map file holds a JSON object", where=where,
                             got=type(data).__name__)
    from weightcast.orchestrator.device_map_explicit import explicit_map
    return explicit_map(index, cluster, data, tied=tied)


# ---------------------------------------------------------------- validation

def validate_device_map(dm: ClusterDeviceMap, *, index: "CheckpointIndex | None" = None,
                        cluster: "ClusterSpec | None" = None) -> None:
    """Raise :class:`DeviceMapError` unless every placement is well formed and within the world
    size (of ``cluster``, else of ``dm.devices``), and, with ``index``, the map covers exactly
    the checkpoint's tensors and every shard slice is non-empty."""
    world = cluster.world_size if cluster is not None else dm.world_size
    if cluster is not None and dm.devices and dm.devices != cluster.devices:
        raise DeviceMapError("The device map was made for another cluster",
                             where=f"cluster {cluster.name!r}",
                             expected=f"{cluster.world_size} ranks on {_names(cluster.devices, 4)}",
                             got=f"{len(dm.devices)} ranks on {_names(dm.devices, 4)}",
                             fix="rebuild the device map for this cluster")
    checked: set[int] = set()  # placements are shared objects: check each once
    for name, p in dm.placements.items():
        if id(p) not in checked:
            _check_placement(name, p, world, dm.devices)
            checked.add(id(p))
    if index is None:
        return
    missing = [n for n in index.names if n not in dm.placements]
    extra = sorted(n for n in dm.placements if n not in index)
    if missing:
        raise DeviceMapError(f"The device map leaves {len(missing)} tensor(s) without a placement",
                             got=_names(missing), fix="rebuild it for this checkpoint")
    if extra:
        raise DeviceMapError(f"The device map places {len(extra)} tensor(s) absent from the "
                             "checkpoint", got=_names(extra), fix="rebuild it for this checkpoint")
    for name, p in dm.placements.items():
        if isinstance(p, Shard):
            check_shardable(name, index.tensor(name).shape, p.dim, len(p.groups[0]))


def _check_placement(name: str, p: Any, world: int | None, devices: Sequence[str]) -> None:
    where = f"tensor {name!r}"
    if isinstance(p, Place):
        ranks: list[int] = [p.rank]
        if not isinstance(p.device, str) or not _DEVICE_RE.fullmatch(p.device):
            raise DeviceMapError("Unknown device", where=where, got=repr(p.device),
                                 expected="cuda:k, cpu or disk")
        if devices and p.rank < len(devices) and p.device.startswith("cuda:") \
                and p.device != devices[p.rank]:
            raise DeviceMapError("A rank only owns its own device", where=where,
                                 expected=devices[p.rank], got=f"{p.rank}:{p.device}")
    elif isinstance(p, Replicate):
        ranks = list(p.ranks)
    elif isinstance(p, Shard):
        ranks = [r for g in p.groups for r in g]
        if isinstance(p.dim, bool) or not isinstance(p.dim, int) or p.dim < 0 or not p.groups \
                or len({len(g) for g in p.groups}) != 1 or not p.groups[0]:
            raise DeviceMapError("A shard needs a dim >= 0 and non-empty groups of one size",
                                 where=where, got=repr(p))
    else:
        raise DeviceMapError("Unknown placement", where=where, got=repr(p),
                             expected="Replicate, Shard or Place")
    if not ranks or len(set(ranks)) != len(ranks) or \
            any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
        raise DeviceMapError("A placement needs distinct ranks >= 0", where=where, got=repr(p))
    if world is not None and max(ranks) >= world:
        raise DeviceMapError("A placement names a rank outside the cluster", where=where,
                             expected=f"ranks 0..{world - 1}", got=repr(p))


# ---------------------------------------------------------------- JSON

def device_map_to_json(dm: ClusterDeviceMap) -> str:
    """Deterministic JSON (sorted keys): rank sets and shard groups are written once and referred
    to by position, so a 1024-rank map stays small."""
    rank_sets: dict[tuple[int, ...], int] = {}
    group_sets: dict[tuple[tuple[int, ...], ...], int] = {}
    placements: dict[str, list[Any]] = {}
    for name in sorted(dm.placements):
        p = dm.placements[name]
        if isinstance(p, Replicate):
            placements[name] = ["R", rank_sets.setdefault(tuple(p.ranks), len(rank_sets))]
        elif isinstance(p, Shard):
            groups = tuple(tuple(g) for g in p.groups)
            placements[name] = ["S", p.dim, group_sets.setdefault(groups, len(group_sets))]
        else:
            placements[name] = ["P", p.rank, p.device]
    doc = {"format": JSON_FORMAT, "version": 1, "strategy": dm.strategy,
           "devices": list(dm.devices), "tp_plan": [list(x) for x in dm.tp_plan],
           "tied": [list(g) for g in dm.tied], "no_split": list(dm.no_split),
           "rank_sets": [list(s) for s in rank_sets], "group_sets": [
               [list(g) for g in gs] for gs in group_sets], "placements": placements}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def device_map_from_json(text: str | bytes) -> ClusterDeviceMap:
    """Inverse of :func:`device_map_to_json`; validates every placement (ranks < world size)."""
    where = "device map JSON"
    doc = _parse_json(text, where)
    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT or doc.get("version") != 1:
        raise DeviceMapError("Not a weightcast device map", where=where,
                             expected=f'{{"format": "{JSON_FORMAT}", "version": 1, ...}}')
    try:
        rank_sets = [Replicate(tuple(s)) for s in doc["rank_sets"]]
        group_sets = [tuple(tuple(g) for g in gs) for gs in doc["group_sets"]]
        shards: dict[tuple[int, int], Shard] = {}
        placements = {str(n): _decode(v, rank_sets, group_sets, shards)
                      for n, v in doc["placements"].items()}
        dm = ClusterDeviceMap(
            placements, str(doc["strategy"]), tuple((str(a), str(b)) for a, b in doc["tp_plan"]),
            tuple(str(d) for d in doc["devices"]), tuple(tuple(map(str, g)) for g in doc["tied"]),
            tuple(str(p) for p in doc["no_split"]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise DeviceMapError("Malformed device map JSON", where=where,
                             got=f"{type(exc).__name__}: {exc}") from None
    validate_device_map(dm)
    return dm


def _decode(v: list[Any], rank_sets: list[Replicate],
            group_sets: list[tuple[tuple[int, ...], ...]],
            shards: dict[tuple[int, int], Shard]) -> Placement:
    """One JSON placement; equal placements come back as one shared object."""
    if v[0] == "R" and len(v) == 2:
        return rank_sets[_index(v[1])]
    if v[0] == "S" and len(v) == 3:
        key = (v[1], _index(v[2]))
        if key not in shards:
            shards[key] = Shard(v[1], group_sets[key[1]])
        return shards[key]
    if v[0] == "P" and len(v) == 3:
        return Place(v[1], v[2])
    raise ValueError(f"unknown placement {v!r}")


def _index(i: Any) -> int:
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
        raise ValueError(f"bad reference {i!r}")
    return i


def _parse_json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeviceMapError("Not valid JSON", where=where, got=str(exc)) from None


# ---------------------------------------------------------------- transformers-style views

def hf_device_map(dm: ClusterDeviceMap, rank: int, cluster: "ClusterSpec | None" = None
                  ) -> dict[str, int | str]:
    """The modules ``rank`` holds, in transformers' ``device_map`` format: its local CUDA index
    (int), ``"cpu"`` or ``"disk"``. Module names are collapsed to the shortest prefix whose
    tensors all sit on one device of this rank (``{"": 0}`` when it holds everything there).
    Tied names absent from the checkpoint follow their partner. Called on any rank."""
    devices = cluster.devices if cluster is not None else dm.devices

    def value(p: Placement) -> int | str | None:
        if isinstance(p, Place):
            device = p.device if p.rank == rank else None
        else:
            if not devices:
                raise DeviceMapError("The device map does not know the ranks' devices",
                                     fix="pass the cluster")
            device = devices[rank] if rank in _owners_of(p) else None
        if device is None:
            return None
        return int(device[5:]) if device.startswith("cuda:") else device

    found = collapse_modules(_with_aliases(dm, value))
    return {k: v for k, v in found.items() if v is not None}


def global_device_map(dm: ClusterDeviceMap) -> dict[str, str]:
    """The whole cluster at a glance: module prefix -> ``"rank:device"`` (``Place``),
    ``"replicate"`` (every rank of the map's world) or ``"replicate:0,1"``, ``"shard:dim0"``."""
    everyone = tuple(range(len(dm.devices))) if dm.devices else None

    def value(p: Placement) -> str:
        if isinstance(p, Place):
            return f"{p.rank}:{p.device}"
        if isinstance(p, Shard):
            return f"shard:dim{p.dim}"
        return "replicate" if tuple(p.ranks) == everyone else \
            "replicate:" + ",".join(map(str, p.ranks))

    return collapse_modules(_with_aliases(dm, value))  # type: ignore[return-value]


def _owners_of(p: Placement) -> frozenset[int]:
    if isinstance(p, Replicate):
        return frozenset(p.ranks)
    if isinstance(p, Shard):
        return frozenset(r for g in p.groups for r in g)
    return frozenset((p.rank,))


def _with_aliases(dm: ClusterDeviceMap, value: Any) -> dict[str, Any]:
    cache: dict[int, Any] = {}
    out: dict[str, Any] = {}
    for name, p in dm.placements.items():
        key = id(p)
        if key not in cache:
            cache[key] = value(p)
        out[name] = cache[key]
    for group in dm.tied:
        present = [n for n in group if n in dm.placements]
        for alias in group:
            if alias not in out and present:
                out[alias] = out[present[0]]
    return out


def collapse_modules(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{tensor name: value}`` -> ``{module: value}``: a module appears when every tensor under
    it has the same value; tensor names appear only when their own module is mixed (so the keys
    are module names, as transformers' ``device_map`` needs). Sorted by key."""
    tree: dict[str, set[str]] = {}
    leaves: dict[str, list[str]] = {}
    for name in values:
        module = name.rpartition(".")[0]
        leaves.setdefault(module, []).append(name)
        child = module
        while child:
            parent = child.rpartition(".")[0]
            tree.setdefault(parent, set()).add(child)
            child = parent
    uniform: dict[str, Any] = {}
    mixed = object()

    def fold(module: str) -> Any:
        seen = {repr(values[n]): values[n] for n in leaves.get(module, ())}
        for child in tree.get(module, ()):
            v = fold(child)
            seen[repr(v) if v is not mixed else "<mixed>"] = v
        result = next(iter(seen.values())) if len(seen) == 1 else mixed
        uniform[module] = result
        return result

    out: dict[str, Any] = {}

    def emit(module: str) -> None:
        if uniform[module] is not mixed:
            out[module] = uniform[module]
            return
        for n in leaves.get(module, ()):
            out[n] = values[n]
        for child in sorted(tree.get(module, ())):
            emit(child)

    if values:
        fold("")
        emit("")
    return dict(sorted(out.items()))
