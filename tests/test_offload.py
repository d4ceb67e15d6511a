"""device_map="auto" honours max_memory: what does not fit the ranks' budgets lands on the last
rank's disk and is offloaded for real (parameters on meta, read back by accelerate's hooks at
each forward, as from_pretrained offloads), never held in memory."""
from __future__ import annotations

import pytest

from tests.ckpt_factory import save_tiny_llama
from tests.ranks import spawn  # forked ranks: see tests/ranks.py

pytestmark = pytest.mark.timeout(300)


def test_disk_modules_offloaded_and_budgets_held(tmp_path) -> None:
    from weightcast.orchestrator.checkpoint import load_index
    save_tiny_llama(tmp_path, tied=False, max_shard_size="40KB")
    total = load_index(str(tmp_path)).total_bytes
    budget = {0: int(total * 0.4), 1: int(total * 0.3)}
    args = {"source": str(tmp_path), "max_memory": budget, "hidden_shape": [1, 8, 64]}
    results = [r.value for r in spawn(2, "tests.offload_jobs:offload_pipeline", args, timeout=240)]
    owners = results[0]["owners"]
    assert set(owners) == {0, 1}, owners
    for rank, r in enumerate(results):
        assert r["resident_bytes"] <= budget[rank], (rank, r["resident_bytes"], budget[rank])
    last = results[owners[-1]]
    assert "lm_head.weight" in last["offloaded"], last
    assert "disk" in last["hf_device_map"].values(), last["hf_device_map"]
    assert last["equal"], last


def test_cpu_budget_bounds_cpu_ranks() -> None:
    from weightcast.orchestrator.cluster import cluster_from_facts
    from weightcast.orchestrator.device_map_auto import memory_caps
    facts = [{"rank": r, "local_rank": r, "host": "n0", "device": "cpu", "device_memory": 8 << 30,
              "host_memory": 8 << 30} for r in range(2)]
    caps, cpu_cap = memory_caps(cluster_from_facts(facts), {"cpu": 1000, 1: 5000})
    assert caps == [1000, 5000] and cpu_cap == 1000
