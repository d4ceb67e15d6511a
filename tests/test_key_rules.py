"""Pure: key rules -> placements (the planner's side of tensor parallelism from the model's plan),
and a rank's held slices addressed in full-tensor coordinates."""
from __future__ import annotations

import pytest
import torch

from weightcast.orchestrator.device_map import Replicate, Shard
from weightcast.orchestrator.errors import DeviceMapError, ModelMismatchError
from weightcast.orchestrator.key_mapping import KeyRule, expert_owners, rule_placements, rules_from_json, rules_to_json


def test_rules_place_shards_experts_and_replicas() -> None:
    groups = ((0, 1), (2, 3))  # two replicas of a 2-way group
    rules = {"q.weight": KeyRule("shard", 0), "o.weight": KeyRule("shard", 1),
             "e.0.w": KeyRule("expert", 0, 0, 4), "e.1.w": KeyRule("expert", 0, 1, 4),
             "e.2.w": KeyRule("expert", 0, 2, 4), "e.3.w": KeyRule("expert", 0, 3, 4)}
    names = [*rules, "norm.weight"]
    p = rule_placements(names, rules, groups, 4)
    assert p["q.weight"] == Shard(0, groups) and p["o.weight"] == Shard(1, groups)
    assert p["e.0.w"] == p["e.1.w"] == Replicate((0, 2))  # experts 0-1 on the first rank of each group
    assert p["e.2.w"] == p["e.3.w"] == Replicate((1, 3))
    assert p["norm.weight"] == Replicate((0, 1, 2, 3))


def test_uneven_experts_follow_torch_chunk() -> None:
    owners = [expert_owners(KeyRule("expert", 0, i, 5), (0, 1, 2)) for i in range(5)]
    assert owners == [(0,), (0,), (1,), (1,), (2,)]  # chunks of ceil(5/3) = 2


def test_rules_round_trip_and_refuse_bad_input() -> None:
    rules = {"a": KeyRule("expert", 0, 3, 8), "b": KeyRule("shard", 1)}
    assert rules_from_json(rules_to_json(rules)) == rules
    with pytest.raises(DeviceMapError):
        rules_from_json({"a": ["diagonal", 0, 0, 0]})
    with pytest.raises(DeviceMapError, match="expert index"):
        rule_placements(["a"], {"a": KeyRule("expert", 0, 9, 8)}, ((0, 1),), 2)


def test_held_tensor_serves_only_its_rows() -> None:
    from weightcast.workers.tp_hf import HeldTensor
    full = torch.arange(24.0).reshape(6, 4)
    held = HeldTensor("w", (6, 4), torch.float32, full[3:6], dim=0, start=3, stop=6)
    assert held.get_shape() == [6, 4]
    assert torch.equal(held[slice(3, 6), slice(0, 4)], full[3:6])
    assert torch.equal(held[slice(4, 6), slice(1, 3)], full[4:6, 1:3])
    with pytest.raises(ModelMismatchError, match="rows \\[3, 6\\)"):
        held[slice(0, 3), slice(0, 4)]
    with pytest.raises(ModelMismatchError, match="holds|nothing"):
        HeldTensor("x", (2,), torch.float32, None)[...]


def test_renamed_map_speaks_of_parameters() -> None:
    from weightcast.orchestrator.device_map import ClusterDeviceMap, Place
    from weightcast.orchestrator.key_mapping import renamed_map
    dm = ClusterDeviceMap({"l.0.moe.experts.0.w1.weight": Place(1), "l.0.moe.experts.1.w1.weight": Place(1),
                           "l.0.moe.gate.weight": Place(1), "embed.weight": Place(0)}, "auto",
                          tied=(("embed.weight", "head.weight"),))
    targets = {"l.0.moe.experts.0.w1.weight": "l.0.mlp.experts.gate_up_proj",
               "l.0.moe.experts.1.w1.weight": "l.0.mlp.experts.gate_up_proj", "l.0.moe.gate.weight": "l.0.mlp.gate.weight"}
    out = renamed_map(dm, targets)
    assert out.placements == {"l.0.mlp.experts.gate_up_proj": Place(1), "l.0.mlp.gate.weight": Place(1),
                              "embed.weight": Place(0)}
    assert out.tied == (("embed.weight", "head.weight"),) and renamed_map(dm, {}) is dm
