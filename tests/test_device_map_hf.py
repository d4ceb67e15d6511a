"""Device maps on a real transformers checkpoint (tiny Llama written by ``save_pretrained``)."""
from __future__ import annotations

import json
import os

import pytest

from ckpt_factory import save_tiny_llama
from weightcast.orchestrator.checkpoint import load_index
from weightcast.orchestrator.cluster import cluster_from_flags
from weightcast.orchestrator.device_map import Place, build_device_map, hf_device_map
from weightcast.orchestrator.errors import DeviceMapError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

KB = 1000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, model, index, config) of a tied tiny Llama in float32 (~353 KB of weights)."""
    directory = tmp_path_factory.mktemp("llama")
    model = save_tiny_llama(directory, tied=True, max_shard_size="100KB")
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    return str(directory), model.eval(), load_index(directory), config


def test_auto_gives_hf_device_maps_transformers_accepts(tiny, tmp_path):
    directory, model, index, config = tiny
    assert "lm_head.weight" not in index  # tied: only the embeddings are saved
    cluster = cluster_from_flags(2, 1, device_memory=10**9)  # two nodes of one GPU each
    dm = build_device_map(index, cluster, "auto", config=config,
                          max_memory={0: 220 * KB, 1: 100 * KB, "cpu": 0})
    maps = [hf_device_map(dm, r) for r in range(2)]
    assert maps[0] == {"lm_head": 0, "model.embed_tokens": 0, "model.layers.0": 0}
    assert maps[1] == {"model.layers.1": "disk", "model.norm": "disk"}
    assert dm.placements["model.layers.1.mlp.up_proj.weight"] == Place(1, "disk")
    # one process stands in for the cluster: every GPU becomes the CPU, disk stays disk
    merged = {k: "disk" if v == "disk" else "cpu" for m in maps for k, v in m.items()}
    loaded = transformers.LlamaForCausalLM.from_pretrained(
        directory, device_map=merged, offload_folder=str(tmp_path / "offload")).eval()
    assert loaded.hf_device_map == merged
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_no_split_module_classes_are_found_from_the_config(tiny):
    _, _, index, config = tiny
    cluster = cluster_from_flags(1, 2, device_memory=10**9)
    dm = build_device_map(index, cluster, "auto", config=config,
                          no_split_module_classes=["LlamaDecoderLayer"])
    assert dm.no_split == ("model.layers.0", "model.layers.1")
    dm = build_device_map(index, cluster, "sequential", config=config, no_split_prefixes=[],
                          no_split_module_classes=["LlamaMLP"], max_memory={0: 150 * KB})
    assert dm.no_split == ("model.layers.0.mlp", "model.layers.1.mlp")
    mlp = {dm.placements[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}
    assert len(mlp) == 1
    attn = dm.placements["model.layers.0.self_attn.q_proj.weight"]
    assert attn != mlp.pop()  # the layer itself was split between its attention and its MLP
    with pytest.raises(DeviceMapError, match="config"):
        build_device_map(index, cluster, "auto", no_split_module_classes=["LlamaDecoderLayer"])


def test_builtin_tp_plan_on_the_real_names(tiny):
    _, model, index, config = tiny
    cluster = cluster_from_flags(1, 2, device_memory=10**9)
    dm = build_device_map(index, cluster, "tp", config=config)
    dims = {n: getattr(p, "dim", None) for n, p in dm.placements.items()}
    assert dims["model.layers.0.self_attn.k_proj.weight"] == 0
    assert dims["model.layers.1.mlp.down_proj.weight"] == 1
    assert dims["model.embed_tokens.weight"] == 0 and dims["model.norm.weight"] is None
    with pytest.raises(DeviceMapError, match="num_key_value_heads = 2"):
        build_device_map(index, cluster_from_flags(1, 4), "tp", config=config)
