"""Sources: local paths, HF repo ids resolved offline from hand-built caches, pickle refusal."""
from __future__ import annotations

import json
import os

import ckpt_factory as cf  # sets HF_HUB_OFFLINE before any hub import
import pytest
import torch

from weightcast.orchestrator.checkpoint import load_index
from weightcast.orchestrator.errors import (CheckpointNotFoundError, ConfigError, PickleRefusedError,
                                 UnsafePathError)
from weightcast.orchestrator.source import config_dtype, resolve_source


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never touch the network, even if huggingface_hub was imported before HF_HUB_OFFLINE was set."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def llama_dir(tmp_path):
    cf.save_tiny_llama(tmp_path / "llama", max_shard_size="100KB")
    return tmp_path / "llama"


@pytest.fixture
def cached_llama(tmp_path, llama_dir):
    cache = tmp_path / "cache"
    snapshot = cf.build_hf_cache(cache, "acme/tiny-llama", cf.dir_files(llama_dir))
    return str(cache), snapshot


def _pickle_dir(path, sharded: bool = False):
    os.makedirs(path, exist_ok=True)
    if sharded:
        torch.save({"a": torch.zeros(2)}, path / "pytorch_model-00001-of-00002.bin")
        torch.save({"b": torch.ones(2)}, path / "pytorch_model-00002-of-00002.bin")
        cf.write_index(path, {"a": "pytorch_model-00001-of-00002.bin",
                              "b": "pytorch_model-00002-of-00002.bin"},
                       name="pytorch_model.bin.index.json")
    else:
        torch.save({"a": torch.zeros(2)}, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    return path


def test_local_directory(llama_dir):
    src = resolve_source(str(llama_dir))
    assert src.root == str(llama_dir) and src.kind == "safetensors"
    assert src.weight_files == tuple(f"model-0000{i}-of-00004.safetensors" for i in range(1, 5))
    assert src.config["model_type"] == "llama" and config_dtype(src.config) == "float32"
    assert (src.repo_id, src.revision, src.cache_root) == (None, None, None)


def test_local_single_file_and_relative_path(tmp_path, monkeypatch):
    path = cf.write_single(tmp_path / "one", name="weights.safetensors")
    src = resolve_source(path)
    assert src.root == str(tmp_path / "one") and src.weight_files == ("weights.safetensors",)
    assert src.config is None
    monkeypatch.chdir(tmp_path)
    assert resolve_source("one").root == str(tmp_path / "one")


def test_repo_id_from_cache(cached_llama, llama_dir):
    cache, snapshot = cached_llama
    for revision in (None, "main", cf.DEFAULT_COMMIT):
        src = resolve_source("acme/tiny-llama", cache_dir=cache, revision=revision)
        assert src.root == snapshot and src.revision == cf.DEFAULT_COMMIT
        assert src.repo_id == "acme/tiny-llama" and src.kind == "safetensors"
        assert src.cache_root == os.path.join(cache, "models--acme--tiny-llama")
        assert len(src.weight_files) == 4 and src.config["hidden_size"] == 64
    index = load_index(src.root, cache_root=src.cache_root)
    assert index.tensors == load_index(llama_dir).tensors


def test_local_files_only_explicit(cached_llama, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # local_files_only alone must suffice
    cache, snapshot = cached_llama
    assert resolve_source("acme/tiny-llama", cache_dir=cache, local_files_only=True).root == snapshot


def test_snapshot_dir_as_local_path(cached_llama):
    _, snapshot = cached_llama
    src = resolve_source(snapshot)
    assert src.repo_id == "acme/tiny-llama" and src.revision == cf.DEFAULT_COMMIT
    assert src.cache_root.endswith("models--acme--tiny-llama")


def test_only_indexed_shards_are_weights(tmp_path, llama_dir):
    files = cf.dir_files(llama_dir)
    files["consolidated.safetensors"] = files["model-00001-of-00004.safetensors"]
    cf.build_hf_cache(tmp_path / "c", "acme/mixed", files)
    src = resolve_source("acme/mixed", cache_dir=str(tmp_path / "c"))
    assert "consolidated.safetensors" not in src.weight_files and len(src.weight_files) == 4


def test_missing_revision_offline(cached_llama):
    cache, _ = cached_llama
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_source("acme/tiny-llama", cache_dir=cache, revision="v9")
    message = str(info.value)
    assert "acme/tiny-llama" in message and "'v9'" in message and "hf download" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_repo_offline(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="acme/absent"):
        resolve_source("acme/absent", cache_dir=str(tmp_path))


def test_path_like_missing_source(tmp_path):
    for source in (str(tmp_path / "nope"), "./nope", "a/b/c", "bad name!"):
        with pytest.raises(CheckpointNotFoundError):
            resolve_source(source, cache_dir=str(tmp_path))


def test_pickle_only_directory_refused_then_allowed(tmp_path):
    path = _pickle_dir(tmp_path / "pk")
    with pytest.raises(PickleRefusedError) as info:
        resolve_source(str(path))
    assert "allow_pickle=True" in str(info.value) and "pytorch_model.bin" in str(info.value)
    src = resolve_source(str(path), allow_pickle=True)
    assert src.kind == "pickle" and src.weight_files == ("pytorch_model.bin",)
    assert config_dtype(src.config) == "float16"


def test_sharded_pickle_uses_its_index(tmp_path):
    path = _pickle_dir(tmp_path / "pk", sharded=True)
    src = resolve_source(str(path), allow_pickle=True)
    assert src.weight_files == ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")


def test_pickle_file_path_refused(tmp_path):
    path = _pickle_dir(tmp_path / "pk") / "pytorch_model.bin"
    with pytest.raises(PickleRefusedError):
        resolve_source(str(path))
    assert resolve_source(str(path), allow_pickle=True).kind == "pickle"


def test_pickle_only_repo(tmp_path):
    path = _pickle_dir(tmp_path / "pk")
    cache = str(tmp_path / "cache")
    cf.build_hf_cache(cache, "acme/old", cf.dir_files(path))
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        resolve_source("acme/old", cache_dir=cache)
    src = resolve_source("acme/old", cache_dir=cache, allow_pickle=True)
    assert src.kind == "pickle" and src.weight_files == ("pytorch_model.bin",)
    assert src.revision == cf.DEFAULT_COMMIT


def test_repo_without_weights(tmp_path):
    cache = str(tmp_path / "cache")
    cf.build_hf_cache(cache, "acme/empty", {"config.json": b"{}"})
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        resolve_source("acme/empty", cache_dir=cache)


def test_config_dtype_spellings():
    assert config_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert config_dtype({"torch_dtype": "float16"}) == "float16"
    assert config_dtype({"dtype": "torch.float32"}) == "float32"
    assert config_dtype({"text_config": {"torch_dtype": "bfloat16"}}) == "bfloat16"
    assert config_dtype({}) is None and config_dtype(None) is None


def test_malformed_config(tmp_path):
    cf.write_single(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="JSON object"):
        resolve_source(str(tmp_path))


def test_cache_blob_link_escaping_the_repo(tmp_path, llama_dir):
    cache = tmp_path / "cache"
    snapshot = cf.build_hf_cache(cache, "acme/tiny-llama", cf.dir_files(llama_dir))
    outside = tmp_path / "stolen.safetensors"
    os.replace(os.path.realpath(os.path.join(snapshot, "model-00002-of-00004.safetensors")), outside)
    link = os.path.join(snapshot, "model-00002-of-00004.safetensors")
    os.remove(link)
    os.symlink(outside, link)
    with pytest.raises(UnsafePathError, match="model-00002-of-00004.safetensors"):
        resolve_source("acme/tiny-llama", cache_dir=str(cache))  # refused before any parsing
    with pytest.raises(UnsafePathError, match="model-00002-of-00004.safetensors"):
        load_index(snapshot)


def test_trainer_pickles_are_not_weights(tmp_path):
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "optimizer.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        resolve_source(str(tmp_path))
