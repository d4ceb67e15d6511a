"""transformers' own key mapping in one process: ``base_model_prefix`` added and stripped, legacy
``gamma`` / ``beta`` renames, a user ``key_mapping``, per-expert keys mapped to fused parameters."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.ckpt_factory import save_tiny_bert, save_tiny_llama, tiny_llama_config
from tests.moe_zoo import save_zoo_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def _load(path, **kw):
    from weightcast.workers.api import load_pretrained
    return load_pretrained(str(path), progress=False, timeout=60, **kw)


def _same_state(mine: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = mine.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert not any(p.is_meta for p in mine.parameters())


def test_causal_lm_save_into_base_model_strips_prefix(tmp_path) -> None:
    from transformers import LlamaModel
    save_tiny_llama(tmp_path, tied=False)
    config = tiny_llama_config(tied=False)
    model, mine = _load(tmp_path, model=lambda: LlamaModel(config), strict=False, output_loading_info=True)
    ref, info = LlamaModel.from_pretrained(str(tmp_path), output_loading_info=True)
    _same_state(model, ref)
    assert mine["unexpected_keys"] == set(info["unexpected_keys"]) == {"lm_head.weight"}
    assert mine["missing_keys"] == set(info["missing_keys"]) == set()


def test_base_model_save_into_causal_lm_adds_prefix(tmp_path) -> None:
    from transformers import LlamaForCausalLM, LlamaModel
    torch.manual_seed(1)
    LlamaModel(tiny_llama_config(tied=True)).save_pretrained(str(tmp_path))
    config = tiny_llama_config(tied=True)
    model = _load(tmp_path, model=lambda: LlamaForCausalLM(config), strict=True)
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path))
    _same_state(model, ref)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, nothing missing
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_legacy_gamma_beta_names_load(tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import BertModel
    save_tiny_bert(tmp_path)
    path = str(tmp_path / "model.safetensors")
    sd = load_file(path)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}
    assert any(k.endswith("gamma") for k in renamed)
    os.remove(path)
    save_file(renamed, path, metadata={"format": "pt"})
    model = _load(tmp_path, model="auto", strict=True)
    _same_state(model, BertModel.from_pretrained(str(tmp_path)))


def test_user_key_mapping(tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    save_tiny_llama(tmp_path, tied=False, max_shard_size="10GB")
    path = str(tmp_path / "model.safetensors")
    sd = load_file(path)
    os.remove(path)
    save_file({k.replace("model.", "transformer.", 1): v for k, v in sd.items()}, path, metadata={"format": "pt"})
    mapping = {r"^transformer\.": "model."}
    with pytest.raises(Exception, match="missing"):
        _load(tmp_path, model="auto", strict=True)
    model = _load(tmp_path, model="auto", strict=True, key_mapping=mapping)
    _same_state(model, LlamaForCausalLM.from_pretrained(str(tmp_path), key_mapping=mapping))


def test_bad_key_mapping_is_a_config_error(tmp_path) -> None:
    from weightcast.orchestrator.errors import ConfigError
    save_tiny_llama(tmp_path)
    with pytest.raises(ConfigError, match="regular expression"):
        _load(tmp_path, model="auto", key_mapping={"(": "x"})
    with pytest.raises(ConfigError, match="key_mapping"):
        _load(tmp_path, model="auto", key_mapping=["^a", "b"])


def test_expert_keys_map_to_fused_parameters(tmp_path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, MixtralForCausalLM
    from weightcast.orchestrator.checkpoint import load_index
    from weightcast.workers.convert import map_checkpoint_keys
    save_zoo_model(tmp_path, "mixtral")
    config = AutoConfig.from_pretrained(str(tmp_path))
    with init_empty_weights():
        model = MixtralForCausalLM(config)
    keys = list(load_index(str(tmp_path)).names)
    mapped = map_checkpoint_keys(model, keys)
    assert mapped["model.layers.1.block_sparse_moe.experts.3.w1.weight"] == \
        ("model.layers.1.mlp.experts.gate_up_proj", ".experts.*.w1.weight")
    assert mapped["model.layers.1.block_sparse_moe.experts.3.w3.weight"][0] == "model.layers.1.mlp.experts.gate_up_proj"
    assert mapped["model.layers.0.block_sparse_moe.gate.weight"] == ("model.layers.0.mlp.gate.weight", None)
    targets = {t for t, _ in mapped.values()}
    assert targets == set(model.state_dict())  # every parameter made by some checkpoint key


def test_key_rules_follow_the_models_tp_and_ep_plans(tmp_path) -> None:
    """Mixtral on 2-way groups: attention split as its tp_plan says (q/k/v rows, o columns), every
    per-expert tensor owned by the rank whose half of the experts holds it, norms and router whole."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, MixtralForCausalLM
    from weightcast.orchestrator.checkpoint import load_index
    from weightcast.orchestrator.key_mapping import KeyRule
    from weightcast.workers.tp_hf import key_rules
    save_zoo_model(tmp_path, "mixtral")
    with init_empty_weights():
        model = MixtralForCausalLM(AutoConfig.from_pretrained(str(tmp_path)))
    shapes = {t.name: tuple(t.shape) for t in load_index(str(tmp_path)).tensors}
    rules = key_rules(model, shapes, 2, 2)
    layer = "model.layers.1."
    assert rules[layer + "self_attn.q_proj.weight"] == KeyRule("shard", 0)
    assert rules[layer + "self_attn.o_proj.weight"] == KeyRule("shard", 1)
    for e in range(4):
        for w in ("w1", "w2", "w3"):
            assert rules[f"{layer}block_sparse_moe.experts.{e}.{w}.weight"] == KeyRule("expert", 0, e, 4)
    assert layer + "block_sparse_moe.gate.weight" not in rules  # replicated
    assert layer + "input_layernorm.weight" not in rules


def test_experts_that_do_not_split_evenly_are_refused_before_reading(tmp_path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, MixtralForCausalLM
    from weightcast.orchestrator.checkpoint import load_index
    from weightcast.orchestrator.errors import ConfigError
    from weightcast.workers.tp_hf import key_rules
    save_zoo_model(tmp_path, "mixtral")  # 4 experts
    with init_empty_weights():
        model = MixtralForCausalLM(AutoConfig.from_pretrained(str(tmp_path)))
    shapes = {t.name: tuple(t.shape) for t in load_index(str(tmp_path)).tensors}
    with pytest.raises(ConfigError, match="experts do not split evenly"):
        key_rules(model, shapes, 3, 3)


def test_fsdp_refuses_converted_keys_before_reading(tmp_path) -> None:
    from weightcast.orchestrator.errors import ConfigError
    save_zoo_model(tmp_path, "mixtral")
    with pytest.raises(ConfigError, match="named as the model.s parameters"):
        _load(tmp_path, model="auto", device_map="fsdp")
