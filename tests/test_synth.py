"""Synthetic checkpoints: shapes match transformers' Llama, sharding matches huggingface_hub,
data is sparse (or seeded random), writes are atomic."""
from __future__ import annotations

import os
import stat

import ckpt_factory  # noqa: F401  (sets HF_HUB_OFFLINE)
import pytest
import torch
from safetensors.torch import load_file

from weightcast.orchestrator import synth
from weightcast.orchestrator.errors import ConfigError
from weightcast.orchestrator.synth import parse_size, write_synthetic


def _meta_state_shapes(root: str) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, LlamaForCausalLM
    config = AutoConfig.from_pretrained(root)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    keys = set(model.state_dict())
    if config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return {k: tuple(model.state_dict()[k].shape) for k in keys}


def test_tiny_sparse_matches_llama_shapes(tmp_path):
    index = write_synthetic(tmp_path / "tiny")
    assert {t.name: t.shape for t in index.tensors} == _meta_state_shapes(index.root)
    assert {t.dtype for t in index.tensors} == {"BF16"} and "lm_head.weight" in index
    assert [f.name for f in index.files] == ["model.safetensors"]
    path = os.path.join(index.root, "model.safetensors")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(index.root).st_mode) == 0o755
    assert all(not v.any() for v in load_file(path).values())  # sparse data reads as zeros


def test_llama_1b_shapes_from_headers(tmp_path):
    index = write_synthetic(tmp_path / "1b", like="llama-1b", max_shard_size="1GB")
    assert index.metadata["total_parameters"] == 1_235_814_400  # Llama-3.2-1B
    assert index.metadata["total_size"] == index.total_bytes == 2 * 1_235_814_400
    assert "lm_head.weight" not in index  # tied
    assert index.tensor("model.embed_tokens.weight").shape == (128256, 2048)
    assert index.tensor("model.layers.15.self_attn.k_proj.weight").shape == (512, 2048)
    assert index.tensor("model.layers.0.mlp.down_proj.weight").shape == (2048, 8192)
    assert {t.name: t.shape for t in index.tensors} == _meta_state_shapes(index.root)
    assert len(index.files) == 3


def test_llama_8b_is_sparse(tmp_path):
    index = write_synthetic(tmp_path / "8b", like="llama-8b", dtype="float16")
    assert index.metadata["total_parameters"] == 8_030_261_248  # Llama-3.1-8B
    assert {t.dtype for t in index.tensors} == {"F16"}
    used = sum(os.stat(os.path.join(index.root, f.name)).st_blocks * 512 for f in index.files)
    assert used < 10_000_000 and sum(f.size for f in index.files) > 16e9


def test_llama_405b_sharded_like_the_hub(tmp_path):
    index = write_synthetic(tmp_path / "405b", like="llama-405b")
    assert len(index.files) == 191  # what meta-llama/Llama-3.1-405B ships
    assert index.files[0].name == "model-00001-of-00191.safetensors"
    assert all(f.size - f.data_start <= 5_000_000_000 for f in index.files)
    assert index.metadata["total_size"] == index.total_bytes
    assert len(index.tensors) == 126 * 9 + 3


def test_random_tiny_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM
    index = write_synthetic(tmp_path / "r", random=True, seed=3, max_shard_size="100KB")
    assert len(index.files) > 1
    model = LlamaForCausalLM.from_pretrained(index.root)
    state = model.state_dict()
    for f in index.files:
        for name, tensor in load_file(os.path.join(index.root, f.name)).items():
            assert torch.equal(state[name], tensor), name
    q = state["model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.01 < q.std() < 0.03 and torch.equal(state["model.norm.weight"].float(), torch.ones(64))


def test_random_is_seeded(tmp_path):
    a = write_synthetic(tmp_path / "a", random=True, seed=1, dtype="float32")
    b = write_synthetic(tmp_path / "b", random=True, seed=1, dtype="float32")
    c = write_synthetic(tmp_path / "c", random=True, seed=2, dtype="float32")
    read = lambda ix: open(os.path.join(ix.root, "model.safetensors"), "rb").read()  # noqa: E731
    assert read(a) == read(b) != read(c)


def test_split_matches_huggingface_hub():
    from huggingface_hub import split_torch_state_dict_into_shards
    tensors = {n: torch.empty(s, dtype=torch.bfloat16)
               for n, s in synth.llama_tensors(synth.SHAPES["tiny"])}
    for limit in (20_000, 50_000, 10**9):
        hub = split_torch_state_dict_into_shards(tensors, max_shard_size=limit)
        ours = synth.split_shards([(n, t.numel() * 2) for n, t in tensors.items()], limit)
        assert [sorted(v) for v in hub.filename_to_tensors.values()] == [sorted(s) for s in ours]


def test_oversized_tensor_gets_its_own_shard():
    shards = synth.split_shards([("a", 3), ("b", 10), ("c", 3), ("d", 3)], 6)
    assert shards == [["b"], ["a", "c"], ["d"]]


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234 and parse_size("1.5kB") == 1500
    for bad in ("5 parsecs", "-1GB", "0", "", "GB"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="random"):
        write_synthetic(tmp_path / "x", like="llama-8b", random=True)
    with pytest.raises(ConfigError, match="shape"):
        write_synthetic(tmp_path / "x", like="gpt-5")
    with pytest.raises(ConfigError, match="dtype"):
        write_synthetic(tmp_path / "x", dtype="int4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        write_synthetic(tmp_path / "full")
    assert os.listdir(tmp_path) == ["full"]


def test_empty_existing_directory_is_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    assert len(write_synthetic(tmp_path / "out").tensors) == 21


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth, "_write_json", boom)
    with pytest.raises(OSError):
        write_synthetic(tmp_path / "out", max_shard_size="100KB")
    assert os.listdir(tmp_path) == []
