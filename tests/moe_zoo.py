"""Tiny models with conversion mappings, saved by transformers' own ``save_pretrained`` (which
writes the legacy on-disk keys: per-expert tensors, ``language_model.model.*``), for the model
layer tests. Nothing here touches the network."""
from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64)

# model_type -> (class name, config kwargs)
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralForCausalLM", dict(_TEXT, intermediate_size=48, num_local_experts=4,
                                           num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(_TEXT, intermediate_size=48, moe_intermediate_size=24,
                                              shared_expert_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2, decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(_TEXT, intermediate_size=48, moe_intermediate_size=24,
                                              num_experts=4, num_experts_per_tok=2, head_dim=8,
                                              decoder_sparse_step=1, tie_word_embeddings=True)),  # lm_head tied
    "deepseek_v3": ("DeepseekV3ForCausalLM", dict(_TEXT, intermediate_size=48, moe_intermediate_size=24,
                                                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                                  first_k_dense_replace=1, n_group=2, topk_group=1,
                                                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                                  qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)),
    "olmoe": ("OlmoeForCausalLM", dict(_TEXT, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                      eos_token_id=1, pad_token_id=0)),
    "mistral3": ("Mistral3ForConditionalGeneration", dict(
        text_config=dict(model_type="mistral", **dict(_TEXT, intermediate_size=48, head_dim=8)),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8, head_dim=8),
        spatial_merge_size=2)),
}


def save_zoo_model(path: str | os.PathLike, model_type: str, *, dtype: str = "float32",
                   max_shard_size: str = "60KB", seed: int = 0) -> str:
    """Save a tiny ``model_type`` model (random weights, seeded) with ``save_pretrained``; returns
    the transformers class name to load it with."""
    import torch
    import transformers
    cls_name, kwargs = ZOO[model_type]
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = getattr(transformers, cls_name)(config).to(getattr(torch, dtype))
    model.save_pretrained(os.fspath(path), max_shard_size=max_shard_size)
    return cls_name
