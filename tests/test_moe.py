"""MoE and converted checkpoints: transformers' own key mapping (conversion mapping, renames,
``base_model_prefix``) applied by weightcast gives the model ``from_pretrained`` gives."""
from __future__ import annotations

import pytest

from tests.moe_zoo import ZOO, save_zoo_model
from weightcast.launch.local import spawn

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_zoo_replicate_bit_identical(tmp_path, model_type: str) -> None:
    cls = save_zoo_model(tmp_path, model_type, dtype="bfloat16")
    results = spawn(2, "tests.moe_jobs:replicate_vs_from_pretrained", {"source": str(tmp_path), "cls": cls},
                    timeout=240)
    for r in results:
        v = r.value
        assert v["type"] == cls and v["meta"] == [], v
        assert v["keys_equal"] and v["differ"] == [], v
        assert v["equal"], v
    read = results[0].value["read"]
    assert sum(read) == results[0].value["checkpoint"], read  # every byte read once: 1.00x


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_zoo_tp_follows_the_models_plan(tmp_path, model_type: str) -> None:
    """device_map="tp" shards as from_pretrained(distributed_config=DistributedConfig(tp_size=2,
    ep_size=2)) does: same local shapes and placements on every rank, half of the experts per rank,
    logits within 1e-5 of the unsharded model, every byte read once."""
    cls = save_zoo_model(tmp_path, model_type, dtype="float32")
    results = spawn(2, "tests.moe_jobs:tp_vs_from_pretrained", {"source": str(tmp_path), "cls": cls}, timeout=240)
    for r in results:
        v = r.value
        assert v["meta"] == [] and v["layout_equal"], v["layout_diff"]
        assert v["vs_whole"] <= 1e-5 and v["vs_hf_tp"] <= 1e-5, v
        if model_type != "mistral3":  # the MoEs: 4 experts, 2 per rank
            assert v["local_experts"] and all(n == 2 for n in v["local_experts"]), v
        assert v["param_bytes"] < 0.7 * v["whole_bytes"], v  # about half (+ replicated norms, router)
    read = results[0].value["read"]
    assert sum(read) == results[0].value["checkpoint"], read


def test_auto_never_splits_an_expert_block(tmp_path) -> None:
    """device_map="auto" over 2 ranks with memory for about 60 % of the model each: every fused
    expert parameter is made on exactly one rank, from its own tensors, equal to from_pretrained's;
    no rank initialises experts it does not hold."""
    from weightcast.orchestrator.checkpoint import load_index
    cls = save_zoo_model(tmp_path, "mixtral", dtype="float32")
    total = load_index(str(tmp_path)).total_bytes
    budget = {0: int(total * 0.6), 1: int(total * 0.6)}
    results = spawn(2, "tests.moe_jobs:auto_vs_from_pretrained",
                    {"source": str(tmp_path), "cls": cls, "max_memory": budget}, timeout=240)
    experts = [set(r.value["experts"]) for r in results]
    assert all(r.value["differ"] == [] for r in results), [r.value for r in results]
    assert experts[0] and experts[1] and not experts[0] & experts[1], experts  # both ranks hold layers
    every = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    assert experts[0] | experts[1] == every, experts
