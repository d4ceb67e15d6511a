"""Tier 2: load_pretrained on 2-4 local gloo ranks, every tensor compared bit for bit."""
from __future__ import annotations

import os

import pytest
import torch

from tests.ranks import spawn  # forked ranks: see tests/ranks.py
from tests.ckpt_factory import sample_tensors, write_sharded

pytestmark = pytest.mark.timeout(300)

STRATEGIES = ["replicate", "tp", "auto", "explicit"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(1)
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(15, 16, generator=g),
        "model.layers.1.mlp.down_proj.weight": torch.randn(16, 7, generator=g),
        "model.norm.weight": torch.randn(16, generator=g),
        "model.count": torch.tensor(7, dtype=torch.int64),
    }
    write_sharded(d, tensors, shards=3)
    return str(d)


def _device_map(strategy: str):
    if strategy == "explicit":
        return {"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": "0:cpu", "": 1}
    return strategy


@pytest.mark.parametrize("transport", ["node-shared", "collective"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bit_exact_and_read_once(sharded: str, strategy: str, transport: str) -> None:
    args = {"source": sharded, "device_map": _device_map(strategy), "transport": transport,
            "verify": True, "timeout": 60, "chunk_bytes": 512}
    results = spawn(2, "weightcast.launch.jobs:load_job", args, timeout=180)
    assert all(r.value["mismatches"] == [] for r in results)
    assert sum(r.value["verified"] for r in results) > 0
    report = results[0].value["report"]
    needed = _needed_bytes(sharded, strategy)
    assert report["total_read_bytes"] == needed
    if strategy == "replicate":
        assert needed == report["checkpoint_bytes"]
        assert all(r["owned_bytes"] == report["checkpoint_bytes"] for r in report["ranks"])


def _needed_bytes(root: str, strategy: str) -> int:
    """Bytes some rank needs: the whole checkpoint for every strategy here (all tensors owned)."""
    from weightcast.orchestrator.checkpoint import load_index
    return load_index(root).total_bytes


def test_four_ranks_tp_node_shared_slices(sharded: str) -> None:
    args = {"source": sharded, "device_map": "tp", "verify": True, "timeout": 60}
    results = spawn(4, "weightcast.launch.jobs:load_job", args, timeout=240)
    assert all(r.value["mismatches"] == [] for r in results)
    report = results[0].value["report"]
    assert report["total_read_bytes"] == report["checkpoint_bytes"]
    owned = [r["owned_bytes"] for r in report["ranks"]]
    assert max(owned) < report["checkpoint_bytes"]  # nobody holds the whole model


def test_single_process_without_distributed(sharded: str, monkeypatch) -> None:
    from safetensors.torch import load_file
    from weightcast.workers.api import load_pretrained
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    sd = load_pretrained(sharded, model=None)
    want = {}
    for f in sorted(os.listdir(sharded)):
        if f.endswith(".safetensors"):
            want.update(load_file(os.path.join(sharded, f)))
    assert sd.keys() == want.keys()
    for k in want:
        assert sd[k].dtype == want[k].dtype and torch.equal(sd[k], want[k])


def test_views_are_copy_on_write(sharded: str, monkeypatch) -> None:
    """Node-shared tensors are private copy-on-write views: writing one never changes the file."""
    from weightcast.workers.api import load_pretrained
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    sd = load_pretrained(sharded, model=None, transport="node-shared")
    name = "model.layers.0.self_attn.q_proj.weight"
    before = sd[name].clone()
    sd[name].add_(1.0)
    again = load_pretrained(sharded, model=None, transport="node-shared")
    assert torch.equal(again[name], before)


NODES = ["n0", "n0", "n1", "n1"]


@pytest.mark.parametrize("strategy", ["replicate", "tp", "auto"])
def test_two_nodes_shared_storage_ring(sharded: str, strategy: str) -> None:
    """2 emulated nodes x 2 ranks: read once per cluster; only what a node needs and did not
    read itself crosses nodes (node-shared ring hops)."""
    args = {"source": sharded, "device_map": strategy, "verify": True, "timeout": 60, "chunk_bytes": 512}
    results = spawn(4, "weightcast.launch.jobs:load_job", args, timeout=240, nodes=NODES)
    assert all(r.value["mismatches"] == [] for r in results)
    report = results[0].value["report"]
    assert report["total_read_bytes"] == report["checkpoint_bytes"]
    ranks = report["ranks"]
    for node in ("n0", "n1"):
        mine = [r for r in ranks if r["node"] == node]
        other = [r for r in ranks if r["node"] != node]
        assert sum(r["cross_node_recv"] for r in mine) <= sum(r["read_bytes"] for r in other)
    if strategy == "replicate":  # each node needs everything: it receives exactly what it did not read
        for node in ("n0", "n1"):
            mine = [r for r in ranks if r["node"] == node]
            assert sum(r["cross_node_recv"] + r["read_bytes"] for r in mine) == report["checkpoint_bytes"]


def test_two_nodes_node_local_storage(sharded: str, tmp_path) -> None:
    """Each node has its own copy in its own directory: each node reads the checkpoint once."""
    import shutil
    for node in ("n0", "n1"):
        shutil.copytree(sharded, tmp_path / node)
    (tmp_path / "cluster.yaml").write_text(
        "name: two-nodes\nstorage: node-local\nnodes:\n  count: 2\n  ranks_per_node: 2\n  host_memory: 16GB\n")
    args = {"source": str(tmp_path / "{node}"), "cluster": str(tmp_path / "cluster.yaml"), "verify": True,
            "verify_root": sharded, "timeout": 60}
    results = spawn(4, "weightcast.launch.jobs:load_job", args, timeout=240, nodes=NODES)
    assert all(r.value["mismatches"] == [] for r in results)
    report = results[0].value["report"]
    for node in ("n0", "n1"):
        assert sum(r["read_bytes"] for r in report["ranks"] if r["node"] == node) == report["checkpoint_bytes"]
        assert sum(r["cross_node_recv"] for r in report["ranks"] if r["node"] == node) == 0


def test_node_local_copies_must_match(sharded: str, tmp_path) -> None:
    import shutil
    from weightcast.orchestrator.errors import CacheError, LoadError
    for node in ("n0", "n1"):
        shutil.copytree(sharded, tmp_path / node)
    victim = sorted(p for p in (tmp_path / "n1").iterdir() if p.suffix == ".safetensors")[0]
    with open(victim, "ab") as fh:
        fh.write(b"\0" * 8)
    (tmp_path / "cluster.yaml").write_text(
        "name: two-nodes\nstorage: node-local\nnodes:\n  count: 2\n  ranks_per_node: 2\n  host_memory: 16GB\n")
    args = {"source": str(tmp_path / "{node}"), "cluster": str(tmp_path / "cluster.yaml"), "timeout": 60}
    with pytest.raises((CacheError, LoadError)) as info:
        spawn(4, "weightcast.launch.jobs:load_job", args, timeout=240, nodes=NODES)
    assert "n1" in str(info.value) and victim.name in str(info.value)
