"""MoE and converted checkpoints: transformers' own key mapping (conversion mapping, renames,
``base_model_prefix``) applied by weightcast gives the model ``from_pretrained`` gives."""
from __future__ import annotations

import pytest

from tests.moe_zoo import ZOO, save_zoo_model
from tests.ranks import spawn  # forked ranks: see tests/ranks.py

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_zoo_replicate_and_tp_match_from_pretrained(tmp_path, model_type: str) -> None:
    """On 2 ranks, in one job per model (saved in fp32 so tp logits compare to 1e-5):

    - ``replicate``: logits bit-identical to from_pretrained, identical state dict keys and tensors;
    - ``tp``: the loading info from_pretrained(distributed_config=...) gives (a tied ``lm_head`` is not
      missing), sharded as from_pretrained(distributed_config=DistributedConfig(tp_size=2, ep_size=2))
      shards it (same local shapes and placements on every rank), half of the experts per rank,
      logits within 1e-5 of the unsharded model, about half the parameter bytes per rank;
    - every checkpoint byte read once (1.00 x) in both.
    """
    cls = save_zoo_model(tmp_path, model_type, dtype="float32")
    results = spawn(2, "tests.moe_jobs:zoo_checks", {"source": str(tmp_path), "cls": cls}, timeout=280)
    for r in results:
        rep, tp = r.value["replicate"], r.value["tp"]
        assert rep["type"] == cls and rep["meta"] == [], rep
        assert rep["keys_equal"] and rep["differ"] == [], rep
        assert rep["equal"], rep
        assert tp["meta"] == [] and tp["layout_equal"], tp["layout_diff"]
        assert tp["info"] == tp["ref_info"], (tp["info"], tp["ref_info"])  # qwen3_moe: lm_head tied
        assert tp["vs_whole"] <= 1e-5 and tp["vs_hf_tp"] <= 1e-5, tp
        if model_type != "mistral3":  # the MoEs: 4 experts, 2 per rank
            assert tp["local_experts"] and all(n == 2 for n in tp["local_experts"]), tp
        assert tp["param_bytes"] < 0.7 * tp["whole_bytes"], tp  # about half (+ replicated norms, router)
    for key in ("replicate", "tp"):
        v = results[0].value[key]
        assert sum(v["read"]) == v["checkpoint"], (key, v["read"])


def test_bf16_replicate_bit_identical(tmp_path) -> None:
    """The conversion keeps bf16 tensors as stored: a bf16 Qwen3-MoE matches from_pretrained bit for bit."""
    cls = save_zoo_model(tmp_path, "qwen3_moe", dtype="bfloat16")
    results = spawn(2, "tests.moe_jobs:replicate_vs_from_pretrained", {"source": str(tmp_path), "cls": cls},
                    timeout=240)
    for r in results:
        assert r.value["equal"] and r.value["keys_equal"] and r.value["differ"] == [], r.value


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
