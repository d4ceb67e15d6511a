"""ClusterSpec: nodes, ranks, devices, memory, storage locality and bandwidths.

Built from a YAML file (``cluster_configs/``, :func:`load_cluster`), from flags
(``--nodes N --gpus-per-node G``, :func:`cluster_from_flags`) or, at run time, from facts the
workers gather from every rank (host name, local rank, device, memory, :func:`cluster_from_facts`).
This module only turns such descriptions into a validated spec; it never talks to other processes
and never looks at the machine it runs on. Called on the coordinator (rank 0) and by the CLI.

YAML schema (every key is checked; unknown keys are errors)::

    name: 16x8-h100                 # optional, default: the file's stem
    storage: shared                 # shared | node-local
    storage_gbps: 12.0              # read bandwidth of ONE node from storage, GB/s
    storage_total_gbps: 48.0        # optional aggregate cap of shared storage, GB/s
    intra_node_gbps: 250.0          # per-rank link inside a node (NVLink, shared memory), GB/s
    inter_node_gbps: 376.0          # per node, one direction, all NICs together, GB/s
    memcpy_gbps: 12.0               # host memcpy of touched memory, GB/s
    first_touch_gbps: 2.2           # first write to fresh host memory, GB/s
    nodes:                          # either identical nodes ...
      count: 16
      gpus_per_node: 8              # or ranks_per_node: R (cpu ranks; device: cuda for GPUs)
      device_memory: 80GiB          # per rank; default for cpu ranks: host_memory / ranks
      host_memory: 2TiB             # per node
      name_prefix: node             # optional: node0, node1, ...
    # ... or a list (heterogeneous): each item has `name` (one node) or `count` (+ `name_prefix`),
    # and gpus | ranks, device, device_memory, host_memory as above.

Memory sizes are integers (bytes) or strings with a unit (``40GB``, ``80GiB``, ``1.5TB``).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from weightcast.orchestrator.errors import ConfigError

GB = 1_000_000_000

STORAGE_KINDS = ("shared", "node-local")
BANDWIDTH_KEYS = ("storage_gbps", "storage_total_gbps", "intra_node_gbps", "inter_node_gbps",
                  "memcpy_gbps", "first_touch_gbps")
TOP_KEYS = ("name", "storage", *BANDWIDTH_KEYS, "nodes", "ranks")
NODE_KEYS = ("name", "count", "name_prefix", "gpus", "gpus_per_node", "ranks", "ranks_per_node",
             "device", "device_memory", "host_memory")
FACT_KEYS = ("rank", "local_rank", "host", "node", "device", "device_memory", "host_memory")
DEFAULT_HOST_MEMORY = 2 * 1024**4  # a DGX H100 node: 2 TiB
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DEVICE_RE = re.compile(r"cpu|cuda:(0|[1-9][0-9]*)")


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
    Bandwidths are in GB/s (10^9 bytes/s) and only feed the cost model:
    ``storage_gbps`` one node's read bandwidth from storage; ``storage_total_gbps`` the aggregate
    cap of shared storage over all nodes (None: no cap); ``intra_node_gbps`` one rank's link to
    the other ranks of its node; ``inter_node_gbps`` one node's network bandwidth in one
    direction, all its NICs together; ``memcpy_gbps`` host copies of touched memory;
    ``first_touch_gbps`` first writes to fresh host memory.
    A spec is validated on construction (:func:`validate_cluster`).
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))
        validate_cluster(self)

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

    @property
    def devices(self) -> tuple[str, ...]:
        """Each rank's device, indexed by rank."""
        return tuple(r.device for r in self.ranks)

    def node_of(self, rank: int) -> str:
        return self.ranks[rank].node

    def ranks_on(self, node: str) -> tuple[int, ...]:
        """The node's global ranks, ordered by local rank."""
        return tuple(r.rank for r in sorted(self.ranks, key=lambda r: r.local_rank)
                     if r.node == node)

    def local_world_size(self, node: str) -> int:
        return sum(1 for r in self.ranks if r.node == node)


# ---------------------------------------------------------------- validation

def validate_cluster(spec: ClusterSpec) -> None:
    """Raise :class:`ConfigError` unless ranks are 0..N-1, each node's local ranks are 0..k-1,
    devices are ``cpu`` or ``cuda:<local index>``, memory and bandwidths are positive."""
    where = f"cluster {spec.name!r}"
    if not spec.ranks:
        raise ConfigError("A cluster needs at least one rank", where=where, got="0 ranks")
    got = [r.rank for r in spec.ranks]
    if got != list(range(len(got))):
        raise ConfigError("Ranks must be 0..N-1 in order, without gaps or repeats", where=where,
                          expected=f"0..{len(got) - 1}", got=_short(got),
                          fix="number ranks contiguously from 0")
    by_node: dict[str, list[RankSpec]] = {}
    for r in spec.ranks:
        _check_rank(r, where)
        by_node.setdefault(r.node, []).append(r)
    for node, ranks in by_node.items():
        _check_node(node, ranks, where)
    if spec.storage not in STORAGE_KINDS:
        raise ConfigError("Unknown storage kind", where=f"{where}, key 'storage'",
                          expected=" or ".join(STORAGE_KINDS), got=repr(spec.storage))
    for key in BANDWIDTH_KEYS:
        value = getattr(spec, key)
        if value is None and key == "storage_total_gbps":
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value <= 0):
            raise ConfigError("A bandwidth must be a positive number of GB/s",
                              where=f"{where}, key {key!r}", got=repr(value))


def _check_rank(r: RankSpec, where: str) -> None:
    at = f"{where}, rank {r.rank}"
    if not isinstance(r.node, str) or not r.node:
        raise ConfigError("A rank needs a node name", where=at, got=repr(r.node))
    if not isinstance(r.device, str) or not _DEVICE_RE.fullmatch(r.device):
        raise ConfigError("Unknown device", where=at, expected="'cpu' or 'cuda:<local index>'",
                          got=repr(r.device))
    for key in ("device_memory", "host_memory"):
        value = getattr(r, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError("Memory must be a positive number of bytes",
                              where=f"{at}, key {key!r}", got=repr(value))


def _check_node(node: str, ranks: list[RankSpec], where: str) -> None:
    at = f"{where}, node {node!r}"
    local = sorted(r.local_rank for r in ranks)
    if local != list(range(len(ranks))):
        raise ConfigError("Local ranks of a node must be 0..k-1, each once", where=at,
                          expected=f"0..{len(ranks) - 1}", got=_short(local))
    for r in ranks:
        if r.device.startswith("cuda:") and int(r.device[5:]) >= len(ranks):
            raise ConfigError(
                "A CUDA device index is local to its node", where=f"{at}, rank {r.rank}",
                expected=f"cuda:0..cuda:{len(ranks) - 1}", got=repr(r.device),
                fix="use the local rank (or the index the process sees), never the global rank")
    if len({r.host_memory for r in ranks}) > 1:
        raise ConfigError("Ranks of one node disagree on its host memory", where=at,
                          got=sorted({r.host_memory for r in ranks}))


def _short(values: Sequence[int]) -> str:
    text = ", ".join(map(str, values[:12]))
    return f"[{text}{', ...' if len(values) > 12 else ''}]"


# ---------------------------------------------------------------- scalar parsing

def parse_bytes(value: object, *, where: str) -> int:
    """A memory size: a non-negative int of bytes, or a string like ``40GB`` / ``80GiB`` / ``1.5TB``."""
    if isinstance(value, bool):
        raise ConfigError("A memory size must be bytes or a string with a unit", where=where,
                          got=repr(value))
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ConfigError("Cannot read a memory size", where=where,
                              expected="bytes, or a number with a unit among B, KB, MB, GB, TB, "
                                       "KiB, MiB, GiB, TiB", got=repr(value))
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ConfigError("A memory size must be bytes or a string with a unit", where=where,
                          got=repr(value))
    if n < 0:
        raise ConfigError("A memory size cannot be negative", where=where, got=repr(value))
    return n


def _int(value: object, *, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"Expected an integer >= {minimum}", where=where, got=repr(value))
    return value


def _gbps(value: object, *, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ConfigError("A bandwidth must be a positive number of GB/s", where=where,
                          got=repr(value))
    return float(value)


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError("Expected a mapping", where=where, got=type(data).__name__)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            raise ConfigError(f"Unknown key {key!r}", where=where,
                              expected="one of " + ", ".join(allowed),
                              fix=f"did you mean {close[0]!r}? Rename or remove it" if close
                              else "remove it")


# ---------------------------------------------------------------- YAML / dict

def load_cluster(path: str | os.PathLike) -> ClusterSpec:
    """Read and validate a cluster YAML file (see the module docstring for the schema).

    ``path`` that is not an existing file may name a configuration shipped with weightcast
    (``16x8-h100`` or ``16x8-h100.yaml``, :mod:`weightcast.cluster_configs`)."""
    import yaml

    where = _shipped_or_path(os.fspath(path))
    try:
        with open(where, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        from weightcast import cluster_configs
        raise ConfigError("Cluster file not found", where=where,
                          expected="a cluster YAML file or the name of a shipped one: "
                                   + ", ".join(cluster_configs.names()),
                          fix="pass an existing file, a shipped name, or use --nodes/--gpus-per-node")
    except yaml.YAMLError as exc:
        raise ConfigError("Cluster file is not valid YAML", where=where,
                          got=" ".join(str(exc).split())) from None
    if data is None:
        raise ConfigError("Cluster file is empty", where=where)
    stem = os.path.splitext(os.path.basename(where))[0]
    return cluster_from_dict(data, where=where, default_name=stem)


def _shipped_or_path(where: str) -> str:
    """``where`` itself when it is a file, else the shipped configuration of that name if any."""
    if os.path.isfile(where):
        return where
    from weightcast import cluster_configs
    return cluster_configs.path(where) or where


def cluster_from_dict(data: Mapping[str, Any], *, where: str = "cluster",
                      default_name: str = "cluster") -> ClusterSpec:
    """Build a spec from a parsed YAML/JSON mapping: ``nodes`` (count form or list) or ``ranks``
    (one mapping per rank, as :func:`cluster_to_dict` writes for irregular clusters)."""
    _check_keys(data, TOP_KEYS, where)
    if ("nodes" in data) == ("ranks" in data):
        raise ConfigError("A cluster needs exactly one of 'nodes' or 'ranks'", where=where,
                          got=sorted(k for k in ("nodes", "ranks") if k in data))
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError("'name' must be a non-empty string", where=f"{where}, key 'name'",
                          got=repr(name))
    if "nodes" in data:
        ranks = _ranks_from_nodes(data["nodes"], f"{where}, key 'nodes'")
    else:
        ranks = _ranks_from_list(data["ranks"], f"{where}, key 'ranks'")
    return ClusterSpec(ranks=ranks, name=name, **_top_options(data, where))


def _top_options(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if "storage" in data:
        if data["storage"] not in STORAGE_KINDS:
            raise ConfigError("Unknown storage kind", where=f"{where}, key 'storage'",
                              expected=" or ".join(STORAGE_KINDS), got=repr(data["storage"]))
        options["storage"] = data["storage"]
    for key in BANDWIDTH_KEYS:
        if key in data and not (key == "storage_total_gbps" and data[key] is None):
            options[key] = _gbps(data[key], where=f"{where}, key {key!r}")
    return options


def _ranks_from_nodes(nodes: Any, where: str) -> tuple[RankSpec, ...]:
    if isinstance(nodes, Mapping):
        if "count" not in nodes:
            raise ConfigError("The mapping form of 'nodes' needs 'count'", where=where,
                              fix="add 'count: N', or give a list of nodes")
        items: list[Any] = [nodes]
    elif isinstance(nodes, list) and nodes:
        items = nodes
    else:
        raise ConfigError("'nodes' must be a mapping with 'count' or a non-empty list", where=where,
                          got=repr(nodes))
    ranks: list[RankSpec] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        at = where if isinstance(nodes, Mapping) else f"{where}[{i}]"
        for name, local in _expand_node(item, at):
            if name in names:
                raise ConfigError("Duplicate node name", where=at, got=repr(name))
            names.add(name)
            base = len(ranks)
            ranks.extend(replace(r, rank=base + j) for j, r in enumerate(local))
    return tuple(ranks)


def _expand_node(item: Any, where: str) -> list[tuple[str, list[RankSpec]]]:
    """One YAML node item -> [(name, its ranks with rank = local index)] (``count`` copies)."""
    _check_keys(item, NODE_KEYS, where)
    if ("name" in item) == ("count" in item):
        raise ConfigError("A node item needs exactly one of 'name' or 'count'", where=where)
    if "name" in item and "name_prefix" in item:
        raise ConfigError("'name_prefix' goes with 'count', not 'name'", where=where)
    count = _int(item.get("count", 1), where=f"{where}, key 'count'", minimum=1)
    prefix = item.get("name_prefix", "node")
    if not isinstance(prefix, str):
        raise ConfigError("'name_prefix' must be a string", where=where, got=repr(prefix))
    n_ranks, device = _node_ranks_and_device(item, where)
    host = parse_bytes(_required(item, "host_memory", where), where=f"{where}, key 'host_memory'")
    if "device_memory" in item:
        dev_mem = parse_bytes(item["device_memory"], where=f"{where}, key 'device_memory'")
    elif device == "cpu":
        dev_mem = host // n_ranks
    else:
        raise ConfigError("GPU nodes need 'device_memory' (bytes per GPU)", where=where,
                          fix="add e.g. 'device_memory: 80GiB'")
    out = []
    for k in range(count):
        name = item["name"] if "name" in item else f"{prefix}{k}"
        if not isinstance(name, str) or not name:
            raise ConfigError("A node name must be a non-empty string", where=where, got=repr(name))
        local = [RankSpec(j, j, name, "cpu" if device == "cpu" else f"cuda:{j}", dev_mem, host)
                 for j in range(n_ranks)]
        out.append((name, local))
    return out


def _node_ranks_and_device(item: Mapping[str, Any], where: str) -> tuple[int, str]:
    given = [k for k in ("gpus", "gpus_per_node", "ranks", "ranks_per_node") if k in item]
    if len(given) != 1:
        raise ConfigError("A node needs exactly one of gpus / gpus_per_node / ranks / "
                          "ranks_per_node", where=where, got=given or "none")
    n = _int(item[given[0]], where=f"{where}, key {given[0]!r}", minimum=1)
    device = item.get("device", "cuda" if given[0].startswith("gpus") else "cpu")
    if device not in ("cpu", "cuda") or (given[0].startswith("gpus") and device != "cuda"):
        raise ConfigError("Unknown node device kind", where=f"{where}, key 'device'",
                          expected="'cpu' or 'cuda' ('gpus' implies cuda)", got=repr(device))
    return n, device


def _required(item: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in item:
        raise ConfigError(f"Missing key {key!r}", where=where)
    return item[key]


def _ranks_from_list(items: Any, where: str) -> tuple[RankSpec, ...]:
    if not isinstance(items, list) or not items:
        raise ConfigError("'ranks' must be a non-empty list", where=where, got=repr(items))
    return tuple(_rank_from_fact(f, f"{where}[{i}]") for i, f in enumerate(items))


def _rank_from_fact(fact: Any, where: str) -> RankSpec:
    _check_keys(fact, FACT_KEYS, where)
    if ("host" in fact) == ("node" in fact):
        raise ConfigError("A rank needs exactly one of 'host' or 'node'", where=where)
    for key in ("rank", "local_rank", "device", "device_memory", "host_memory"):
        _required(fact, key, where)
    node = fact.get("host", fact.get("node"))
    if not isinstance(node, str) or not node:
        raise ConfigError("A host name must be a non-empty string", where=where, got=repr(node))
    return RankSpec(
        rank=_int(fact["rank"], where=f"{where}, key 'rank'"),
        local_rank=_int(fact["local_rank"], where=f"{where}, key 'local_rank'"),
        node=node, device=str(fact["device"]),
        device_memory=parse_bytes(fact["device_memory"], where=f"{where}, key 'device_memory'"),
        host_memory=parse_bytes(fact["host_memory"], where=f"{where}, key 'host_memory'"))


# ---------------------------------------------------------------- flags and facts

def cluster_from_flags(nodes: int, gpus_per_node: int, *, device_memory: int | float = 80e9,
                       host_memory: int | float = DEFAULT_HOST_MEMORY, cpu: bool = False,
                       storage: str = "shared", name: str | None = None,
                       bandwidths: Mapping[str, float] | None = None) -> ClusterSpec:
    """``--nodes N --gpus-per-node G``: N identical nodes ``node0..`` of G ranks each on
    ``cuda:0..G-1`` (``cpu=True``: G cpu ranks). ``bandwidths`` overrides ClusterSpec defaults."""
    where = "flags"
    _int(nodes, where=f"{where}, --nodes", minimum=1)
    _int(gpus_per_node, where=f"{where}, --gpus-per-node", minimum=1)
    dev = parse_bytes(device_memory, where=f"{where}, device_memory")
    host = parse_bytes(host_memory, where=f"{where}, host_memory")
    ranks = tuple(
        RankSpec(n * gpus_per_node + j, j, f"node{n}", "cpu" if cpu else f"cuda:{j}", dev, host)
        for n in range(nodes) for j in range(gpus_per_node))
    _check_keys(dict(bandwidths or {}), BANDWIDTH_KEYS, f"{where}, bandwidths")
    options = _top_options({"storage": storage, **dict(bandwidths or {})}, where)
    kind = "cpu" if cpu else "gpu"
    return ClusterSpec(ranks=ranks, name=name or f"{nodes}x{gpus_per_node}-{kind}", **options)


def cluster_from_facts(facts: Sequence[Mapping[str, Any]], *, template: ClusterSpec | None = None,
                       name: str | None = None) -> ClusterSpec:
    """Build the spec from what each rank reports at run time: ``{rank, local_rank, host, device,
    device_memory, host_memory}`` (any order; nodes ordered by their lowest rank). Storage and
    bandwidths come from ``template`` (e.g. the cluster YAML) when given, else the defaults."""
    if isinstance(facts, (str, bytes)) or not isinstance(facts, Sequence) or not facts:
        raise ConfigError("Rank facts must be a non-empty list of mappings", where="rank facts",
                          got=type(facts).__name__)
    ranks = sorted((_rank_from_fact(f, f"rank facts[{i}]") for i, f in enumerate(facts)),
                   key=lambda r: r.rank)
    options: dict[str, Any] = {}
    if template is not None:
        options = {key: getattr(template, key) for key in ("storage", *BANDWIDTH_KEYS)}
    label = name or (template.name if template is not None else "runtime")
    return ClusterSpec(ranks=tuple(ranks), name=label, **options)


# ---------------------------------------------------------------- dict / JSON

def cluster_to_dict(spec: ClusterSpec) -> dict[str, Any]:
    """A plain mapping that :func:`cluster_from_dict` turns back into an equal spec: a list of
    nodes where every node is regular (ranks contiguous, ``cuda:<local rank>`` or ``cpu``,
    one memory size), else one entry per rank."""
    out: dict[str, Any] = {"name": spec.name, "storage": spec.storage}
    for key in BANDWIDTH_KEYS:
        value = getattr(spec, key)
        if value is not None:
            out[key] = value
    nodes = [_node_item(spec, node) for node in spec.nodes]
    if all(item is not None for item in nodes):
        out["nodes"] = nodes
    else:
        out["ranks"] = [{"rank": r.rank, "local_rank": r.local_rank, "node": r.node,
                         "device": r.device, "device_memory": r.device_memory,
                         "host_memory": r.host_memory} for r in spec.ranks]
    return out


def _node_item(spec: ClusterSpec, node: str) -> dict[str, Any] | None:
    ranks = [spec.ranks[i] for i in spec.ranks_on(node)]
    first = ranks[0].rank
    cpu = ranks[0].device == "cpu"
    regular = all(r.rank == first + r.local_rank and r.device_memory == ranks[0].device_memory
                  and r.device == ("cpu" if cpu else f"cuda:{r.local_rank}") for r in ranks)
    if not regular:
        return None
    return {"name": node, "ranks" if cpu else "gpus": len(ranks),
            "device_memory": ranks[0].device_memory, "host_memory": ranks[0].host_memory}


def cluster_to_json(spec: ClusterSpec) -> str:
    """Deterministic JSON (sorted keys) of :func:`cluster_to_dict`."""
    return json.dumps(cluster_to_dict(spec), sort_keys=True, indent=1)


def cluster_from_json(text: str) -> ClusterSpec:
    """Inverse of :func:`cluster_to_json`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("Cluster JSON is not valid JSON", where="cluster JSON", got=str(exc))
    return cluster_from_dict(data, where="cluster JSON")
