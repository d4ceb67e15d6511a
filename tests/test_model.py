"""Tier 2: load_pretrained(model="auto") gives the same model as transformers' from_pretrained."""
from __future__ import annotations

import pytest
import torch

from tests.ranks import spawn  # forked ranks: see tests/ranks.py
from weightcast.launch import local
from tests.ckpt_factory import save_tiny_bert, save_tiny_llama

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("llama")
    save_tiny_llama(d, tied=True, max_shard_size="40KB", dtype="bfloat16")
    return str(d)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("bert")
    save_tiny_bert(d, max_shard_size="30KB")
    return str(d)


@pytest.mark.parametrize("transport", ["node-shared", "collective"])
def test_llama_replicate_logits_identical(llama_bf16: str, transport: str) -> None:
    results = spawn(2, "tests.model_jobs:replicate_logits",
                    {"source": llama_bf16, "cls": "LlamaForCausalLM", "transport": transport}, timeout=240)
    for r in results:
        assert r.value["meta"] == []
        assert r.value["dtype"] == "torch.bfloat16"
        assert r.value["equal"], r.value


def test_bert_replicate_logits_identical(bert: str) -> None:
    results = spawn(2, "tests.model_jobs:replicate_logits", {"source": bert, "cls": "BertModel"}, timeout=240)
    assert all(r.value["equal"] and r.value["meta"] == [] for r in results), [r.value for r in results]


def test_llama_auto_pipeline_over_two_ranks(llama_bf16: str) -> None:
    from weightcast.orchestrator.checkpoint import load_index
    total = load_index(llama_bf16).total_bytes
    budget = {0: int(total * 0.6), 1: int(total * 0.6)}  # forces layers onto both ranks
    args = {"source": llama_bf16, "max_memory": budget, "dtype": "bfloat16",
            "shape": [1, 8, 64], "logits_shape": [1, 8, 256]}
    results = spawn(2, "tests.model_jobs:pipeline_logits", args, timeout=240)
    owners = results[0].value["owners"]
    assert set(owners) == {0, 1}, owners  # a real pipeline: both ranks hold stages
    assert results[0].value["equal"], results[0].value
    for r in results:
        assert r.value["hf_device_map"], "model.hf_device_map is set"


def test_no_random_init(llama_bf16: str) -> None:
    results = spawn(1, "tests.model_jobs:no_init_load", {"source": llama_bf16}, timeout=240)
    value = results[0].value
    assert value["calls"] == [] and value["meta"] == [] and value["n_params"] > 0


def test_skeleton_is_on_meta() -> None:
    from weightcast.workers.materialize import build_skeleton
    config = save_config()
    module = build_skeleton("auto", config)
    assert all(p.is_meta for p in module.parameters())
    # non-persistent buffers (rotary inv_freq) are computed for real, in fp32, as from_pretrained does
    buffers = dict(module.named_buffers())
    inv = [b for n, b in buffers.items() if n.endswith("inv_freq")]
    assert inv and all(not b.is_meta and b.dtype == torch.float32 for b in inv)


def save_config() -> dict:
    from tests.ckpt_factory import tiny_llama_config
    return tiny_llama_config().to_dict()


def test_tp_four_ranks_private_memory(tmp_path) -> None:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.{p}.weight": torch.randn(1024, 1024, generator=g)
               for i in range(4) for p in ("up_proj", "down_proj")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    # a new interpreter per rank: a forked rank's first writes to inherited pages would count as private growth
    results = local.spawn(4, "tests.model_jobs:tp_memory", {"source": str(tmp_path)}, timeout=240)
    checkpoint = results[0].value["checkpoint"]
    for r in results:
        v = r.value
        assert v["owned"] == checkpoint // 4
        # dim-1 shards (down_proj) are private copies, dim-0 shards are page-cache views:
        # growth stays near this rank's share, far below the whole model
        assert v["private_growth"] <= v["owned"] + (24 << 20), v
        assert v["private_growth"] < checkpoint / 2, v


def test_old_checkpoint_with_saved_position_ids_loads_strict(tmp_path, monkeypatch) -> None:
    """Checkpoints saved by older transformers carry BERT's non-persistent ``position_ids``
    buffer (all-MiniLM-L6-v2 does); from_pretrained ignores it, so does a strict load here."""
    from safetensors.torch import load_file, save_file
    from weightcast.workers.api import load_pretrained
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    save_tiny_bert(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    sd["embeddings.position_ids"] = torch.arange(64)[None]
    save_file(sd, str(path), metadata={"format": "pt"})
    model = load_pretrained(str(tmp_path), model="auto", strict=True, progress=False)
    assert torch.equal(model.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])
    with pytest.raises(Exception, match="unexpected"):
        sd["not.a.model.key"] = torch.zeros(2)
        save_file(sd, str(path), metadata={"format": "pt"})
        load_pretrained(str(tmp_path), model="auto", strict=True, progress=False)
