"""``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential`` device maps: accelerate's ``infer_auto_device_map``
generalised from the devices of one machine to every device of the cluster, from names alone.

Called by :func:`weightcast.orchestrator.device_map.build_device_map` on the coordinator or in the CLI.

How a map is made:

1. Tensors are grouped into *units* that are never split: a no-split module (by default every
   numbered block such as ``model.layers.7``; or the prefixes / module classes given), else the
   module holding the tensor (a module's weight and bias always stay together). Tied tensors
   (``tied``, or the input embedding and ``lm_head`` when the config says
   ``tie_word_embeddings``) join one unit.
2. Units are ordered like the model: embeddings first, numbered blocks in numeric order, other
   modules, heads (``lm_head``...) last; ties broken by position in the checkpoint.
3. Units fill the devices of the ranks in rank order, each within its ``max_memory`` (default
   90% of the device memory). ``sequential`` fills each device before moving on; ``balanced``
   (and ``auto``, as transformers' ``device_map="auto"``) aims at an equal share per device and
   falls back to ``sequential`` when that would spill more. ``balanced_low_0`` (accelerate's
   ``low_zero``) balances over ranks 1.. and leaves rank 0 only what they cannot hold.
4. What does not fit goes to the last rank's host (``Place(last, "cpu")``, within
   ``max_memory["cpu"]``, default 90% of that rank's share of its node's host memory), then to
   its disk (``Place(last, "disk")``).
"""
from __future__ import annotations

import fnmatch
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from weightcast.orchestrator.device_map_types import ClusterDeviceMap, Place
from weightcast.orchestrator.errors import DeviceMapError

if TYPE_CHECKING:
    from weightcast.orchestrator.checkpoint import CheckpointIndex
    from weightcast.orchestrator.cluster import ClusterSpec

MEMORY_FRACTION = 0.9
EMBED_SUFFIXES = ("embed_tokens.weight", "tok_embeddings.weight", "word_embeddings.weight",
                  "wte.weight", "embed_in.weight", "shared.weight")
OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
HEAD_MODULES = ("lm_head", "embed_out", "output", "classifier", "score", "head", "qa_outputs",
                "cls", "pooler")


# ---------------------------------------------------------------- tied weights

def tied_groups(index: "CheckpointIndex", tied: Sequence[Sequence[str]] | None,
                config: Mapping[str, Any] | None) -> tuple[tuple[str, ...], ...]:
    """Groups of tensor names kept on one rank: ``tied`` as given, plus the input embedding and
    the output head when ``config`` (or its ``text_config``) has ``tie_word_embeddings: true``
    (``lm_head.weight`` may then be absent from the checkpoint)."""
    groups: list[tuple[str, ...]] = []
    for group in tied or ():
        names = tuple(group)
        if isinstance(group, str) or len(names) < 2 or not any(n in index for n in names):
            raise DeviceMapError("A tied group names two or more tensors, one of them in the "
                                 "checkpoint", where="tied", got=repr(group))
        groups.append(names)
    if config is not None and _ties_embeddings(config):
        embeds = sorted((n for n in index.names if n.endswith(EMBED_SUFFIXES)), key=len)
        outputs = [n for n in OUTPUT_NAMES if n in index] or ["lm_head.weight"]
        if embeds and not any(embeds[0] in g and outputs[0] in g for g in groups):
            groups.append((embeds[0], outputs[0]))
    return tuple(groups)


def _ties_embeddings(config: Mapping[str, Any]) -> bool:
    text = config.get("text_config")
    if isinstance(text, Mapping) and "tie_word_embeddings" in text:
        return text["tie_word_embeddings"] is True
    return config.get("tie_word_embeddings") is True


# ---------------------------------------------------------------- the map

def auto_map(index: "CheckpointIndex", cluster: "ClusterSpec", strategy: str, *,
             max_memory: Mapping[Any, Any] | None, tied: tuple[tuple[str, ...], ...],
             no_split_module_classes: Sequence[str] | None,
             no_split_prefixes: Sequence[str] | None,
             config: Mapping[str, Any] | None) -> ClusterDeviceMap:
    """Units (see the module docstring) placed over every rank's device, then cpu, then disk."""
    prefixes = list(no_split_prefixes) if no_split_prefixes is not None else None
    if no_split_module_classes:
        prefixes = (prefixes or []) + class_prefixes(no_split_module_classes, config)
    units, no_split = make_units(index, prefixes, tied)
    caps, cpu_cap = memory_caps(cluster, max_memory)
    sizes = [sum(index.tensor(n).length for n in names if n in index) for _, names in units]
    if strategy == "balanced_low_0" and len(caps) > 1:  # as accelerate: rank 0 keeps only the overflow
        caps[0] = min(caps[0], max(0, sum(sizes) - sum(caps[1:])))
    if strategy == "sequential":
        where = fill(sizes, caps, balanced=False)
    else:
        where = fill(sizes, caps, balanced=True)
        plain = fill(sizes, caps, balanced=False)
        if _spilled(where, sizes) > _spilled(plain, sizes):
            where = plain
    last = cluster.world_size - 1
    spill_cpu = cluster.ranks[last].device != "cpu"
    placements: dict[str, Place] = {}
    cpu_used = 0
    for (_, names), size, d in zip(units, sizes, where):
        if d is not None:
            place = Place(d, cluster.ranks[d].device)
        elif spill_cpu and cpu_used + size <= cpu_cap:
            cpu_used += size
            place = Place(last, "cpu")
        else:
            spill_cpu = False  # once on disk, later units do not come back to the host
            place = Place(last, "disk")
        placements.update((n, place) for n in names if n in index)
    return ClusterDeviceMap(placements, strategy, devices=cluster.devices, tied=tied,
                            no_split=tuple(sorted(no_split)))


def _spilled(where: Sequence[int | None], sizes: Sequence[int]) -> int:
    return sum(s for d, s in zip(where, sizes) if d is None)


def memory_caps(cluster: "ClusterSpec", max_memory: Mapping[Any, Any] | None
                ) -> tuple[list[int], int]:
    """Per-rank budgets and the spill budget of the last rank's host, from ``max_memory``
    (``{rank: bytes or "40GB", "cpu": ...}``; rank keys may be strings of digits). ``"cpu"`` also
    bounds every CPU rank without a key of its own (its device memory is its host's)."""
    from weightcast.orchestrator.cluster import parse_bytes

    caps = [int(r.device_memory * MEMORY_FRACTION) for r in cluster.ranks]
    last = cluster.ranks[-1]
    cpu_cap = int(last.host_memory * MEMORY_FRACTION) // cluster.local_world_size(last.node)
    explicit: set[int] = set()
    for key, value in (max_memory or {}).items():
        where = f"max_memory[{key!r}]"
        if key == "cpu":
            cpu_cap = parse_bytes(value, where=where)
            continue
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(caps):
            raise DeviceMapError("max_memory keys are ranks of the cluster or 'cpu'", where=where,
                                 expected=f"0..{len(caps) - 1} or 'cpu'", got=repr(key))
        caps[key] = parse_bytes(value, where=where)
        explicit.add(key)
    if "cpu" in (max_memory or {}):  # a CPU rank's device is its host: the "cpu" budget bounds it too
        for r, spec in enumerate(cluster.ranks):
            if spec.device == "cpu" and r not in explicit:
                caps[r] = min(caps[r], cpu_cap)
    return caps, cpu_cap


def fill(sizes: Sequence[int], caps: Sequence[int], *, balanced: bool) -> list[int | None]:
    """Device index of each unit, in order, never going back to an earlier device; None: spill.

    ``balanced`` moves on to device k once the unit's middle lies past k/D of the total size,
    so each of the D devices gets about an equal share; a device never exceeds its cap."""
    total = sum(sizes)
    usable = [i for i, c in enumerate(caps) if c > 0]
    share = total / len(usable) if usable and total else math.inf
    used = [0] * len(caps)
    out: list[int | None] = []
    start, d = 0, 0
    for size in sizes:
        if balanced and d < len(caps):
            target = min(int((start + size / 2) // share), len(usable) - 1)
            d = max(d, usable[target]) if usable else d
        while d < len(caps) and used[d] + size > caps[d]:
            d += 1
        if d < len(caps):
            used[d] += size
            out.append(d)
        else:
            out.append(None)
        start += size
    return out


# ---------------------------------------------------------------- units

def make_units(index: "CheckpointIndex", no_split: Sequence[str] | None,
               tied: tuple[tuple[str, ...], ...]) -> tuple[list[tuple[str, list[str]]], set[str]]:
    """``[(unit key, tensor names)]`` in model order, and the no-split prefixes used. ``no_split``
    holds fnmatch patterns of module names (None: every numbered block, e.g. ``model.layers.3``).
    Names of ``tied`` absent from the checkpoint join their group's unit."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for name in index.names:
        key = _no_split_key(name, no_split)
        if key is not None:
            used.add(key)
        keys[name] = key if key is not None else (name.rpartition(".")[0] or name)
    members: dict[str, list[str]] = {}
    for name in index.names:
        members.setdefault(keys[name], []).append(name)
    order = _model_order(index)
    merged = _merge_tied(members, keys, tied, order)
    units = sorted(merged.items(), key=lambda kv: order(kv[0]))
    return units, used


def _no_split_key(name: str, patterns: Sequence[str] | None) -> str | None:
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if patterns is None:
            if parts[i - 1].isdigit():
                return prefix
        elif any(fnmatch.fnmatchcase(prefix, p) for p in patterns):
            return prefix
    return None


def _merge_tied(members: dict[str, list[str]], keys: Mapping[str, str],
                tied: tuple[tuple[str, ...], ...], order: Any) -> dict[str, list[str]]:
    parent = {k: k for k in members}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    extra: dict[str, list[str]] = {}
    for group in tied:
        present = sorted({keys[n] for n in group if n in keys}, key=order)
        for k in present[1:]:
            a, b = find(present[0]), find(k)
            if a != b:
                parent[b] = a
        extra.setdefault(present[0], []).extend(n for n in group if n not in keys)
    merged: dict[str, list[str]] = {}
    for k in sorted(members, key=order):
        merged.setdefault(find(k), []).extend(members[k])
    for k, names in extra.items():
        merged[find(k)].extend(names)
    return merged


def _model_order(index: "CheckpointIndex") -> Any:
    """Sort key of a module prefix: per component (category, number or first position)."""
    first: dict[str, int] = {}
    has_numbered: set[str] = set()
    for pos, t in enumerate(index.tensors):
        parts = t.name.split(".")
        for i in range(1, len(parts) + 1):
            first.setdefault(".".join(parts[:i]), pos)
            if i < len(parts) and parts[i].isdigit():
                has_numbered.add(".".join(parts[:i]))

    def component(prefix: str, part: str) -> tuple[int, int]:
        if part.isdigit():
            return (1, int(part))
        if part in HEAD_MODULES:
            return (3, first.get(prefix, 0))
        if ("embed" in part and part != "embed_out") or part in ("wte", "wpe", "shared"):
            return (0, first.get(prefix, 0))
        return (1 if prefix in has_numbered else 2, first.get(prefix, 0))

    def key(unit: str) -> tuple[tuple[int, int], ...]:
        parts = unit.split(".")
        return tuple(component(".".join(parts[:i + 1]), p) for i, p in enumerate(parts))

    return key


def class_prefixes(classes: Sequence[str], config: Mapping[str, Any] | None) -> list[str]:
    """Module names whose class is in ``classes``, found by building the model of ``config``
    on the meta device (needs transformers; no weights are allocated)."""
    if not config or not config.get("architectures"):
        raise DeviceMapError("no_split_module_classes needs the model's config.json "
                             "(with 'architectures') to find those modules",
                             fix="pass config=..., or name module prefixes in no_split_prefixes")
    import transformers
    from accelerate import init_empty_weights

    arch = config["architectures"][0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise DeviceMapError("Unknown model architecture", where="config 'architectures'",
                             got=repr(arch), fix="use no_split_prefixes instead")
    cfg = transformers.AutoConfig.for_model(**dict(config))
    with init_empty_weights(include_buffers=True):
        model = cls._from_config(cfg)
    wanted = set(classes)
    return [n for n, m in model.named_modules() if n and type(m).__name__ in wanted]
