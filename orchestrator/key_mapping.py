"""How each checkpoint tensor is split over a tensor-parallel group, as plain data.

The model layer (on the coordinator, with transformers) maps every checkpoint key to the parameter
it makes and reads the parameter's placement from the model's own ``tp_plan`` / ``ep_plan``; it
hands the planner one :class:`KeyRule` per checkpoint key. The planner stays pure: it only turns
rules into placements (:func:`rule_placements`), so each rank reads the sources of what it owns.

- ``replicate``: every rank of the group needs the whole tensor (a replicated parameter, or one
  whose split this planner does not express, which the rank then slices itself);
- ``shard``: the tensor is split along ``dim`` like the parameter it is renamed to
  (``torch.chunk`` bounds, :func:`weightcast.orchestrator.device_map.shard_bounds`);
- ``expert``: the tensor is expert ``index`` of ``count`` experts merged into one parameter whose
  expert dimension is split over the group: only the ranks whose expert range holds ``index``
  need it, whole.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from weightcast.orchestrator.device_map_types import ClusterDeviceMap, Placement, Replicate, Shard, shard_bounds
from weightcast.orchestrator.errors import ConfigError, DeviceMapError

KINDS = ("replicate", "shard", "expert")


@dataclass(frozen=True, slots=True)
class KeyRule:
    kind: str = "replicate"
    dim: int = 0
    index: int = 0
    count: int = 0

    def to_json(self) -> list:
        return [self.kind, self.dim, self.index, self.count]

    @classmethod
    def from_json(cls, data: list) -> "KeyRule":
        if not (isinstance(data, list) and len(data) == 4 and data[0] in KINDS
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in data[1:])):
            raise DeviceMapError("A key rule is [kind, dim, index, count]", got=repr(data)[:200],
                                 expected=f"kind in {KINDS}, non-negative integers")
        return cls(*data)


def rules_to_json(rules: Mapping[str, KeyRule]) -> dict[str, list]:
    return {name: rule.to_json() for name, rule in sorted(rules.items())}


def rules_from_json(data: Mapping[str, list]) -> dict[str, KeyRule]:
    return {name: KeyRule.from_json(value) for name, value in data.items()}


def expert_owners(rule: KeyRule, group: tuple[int, ...]) -> tuple[int, ...]:
    """The ranks of ``group`` whose share of the expert dimension holds expert ``rule.index``."""
    parts = len(group)
    return tuple(r for i, r in enumerate(group)
                 if shard_bounds(rule.count, parts, i)[0] <= rule.index < shard_bounds(rule.count, parts, i)[1])


def rule_placements(names: list[str], rules: Mapping[str, KeyRule], groups: tuple[tuple[int, ...], ...],
                    world_size: int) -> dict[str, Placement]:
    """Placement of every checkpoint tensor in ``names`` from its rule (missing rule: replicated).
    ``groups`` are the tensor-parallel groups (replicas of one another). Pure."""
    everyone = Replicate(tuple(range(world_size)))
    shards: dict[int, Shard] = {}
    out: dict[str, Placement] = {}
    for name in names:
        rule = rules.get(name, KeyRule())
        if rule.kind == "shard" and len(groups[0]) > 1:
            out[name] = shards.setdefault(rule.dim, Shard(rule.dim, groups))
        elif rule.kind == "expert" and len(groups[0]) > 1:
            if not 0 <= rule.index < rule.count:
                raise DeviceMapError("An expert index lies outside its parameter", where=f"tensor {name!r}",
                                     expected=f"0 <= index < {rule.count}", got=str(rule.index))
            out[name] = Replicate(tuple(sorted(r for g in groups for r in expert_owners(rule, g))))
        else:
            out[name] = everyone
    return out


def renamed_map(dm: ClusterDeviceMap, targets: Mapping[str, str]) -> ClusterDeviceMap:
    """``dm`` with checkpoint names replaced by the parameter names they load into (``targets``:
    checkpoint key -> parameter, only where they differ; several keys merged into one parameter
    share its placement, the first one's), so per-rank ownership and ``hf_device_map`` speak of
    the model's parameters (``mlp.experts.gate_up_proj``, not ``block_sparse_moe.experts.3.w1``).
    Pure."""
    if not targets:
        return dm
    placements: dict[str, Placement] = {}
    for name, p in dm.placements.items():
        placements.setdefault(targets.get(name, name), p)
    tied = tuple(tuple(dict.fromkeys(targets.get(n, n) for n in group)) for group in dm.tied)
    return replace(dm, placements=placements, tied=tuple(g for g in tied if len(g) > 1))


def refuse_converted_fsdp(targets: Mapping[str, str]) -> None:
    """``device_map="fsdp"``: FSDP2 rows are cut from tensors named as the parameters; a checkpoint
    whose keys transformers renames or converts (``targets``: per-expert MoE tensors, a base-model
    prefix) is refused at planning, before any byte is read. Pure."""
    if targets:
        key, target = next(iter(sorted(targets.items())))
        raise ConfigError("device_map='fsdp' needs checkpoint keys named as the model's parameters",
                          where=f"{len(targets)} checkpoint keys", got=f"{key!r} loads into {target!r}",
                          expected="no renamed or converted keys",
                          fix="load this checkpoint with device_map='replicate', 'tp' or 'auto'")
