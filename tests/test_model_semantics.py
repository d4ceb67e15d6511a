"""load_pretrained behaves as from_pretrained on the cases where a re-implementation drifts:
dtype rules, ties, generation config, classes and config overrides, remote code, explicit
files, pickle with a model. One process each (the per-rank cases are in test_task_heads.py)."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from tests.ckpt_factory import save_tiny_llama, tiny_llama_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def _load(source, **kw):
    from weightcast.workers.api import load_pretrained
    return load_pretrained(str(source), progress=False, timeout=60, **kw)


def _assert_same_state(mine: torch.nn.Module, ref: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    a, b = mine.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        if not k.startswith(skip):
            assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
            assert torch.equal(a[k], b[k]), k


def _edit_config(directory, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


def _save_file(tensors: dict, path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------- dtype rules

def test_keep_in_fp32_modules_t5_wo_stays_fp32(tmp_path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(str(tmp_path))
    mine = _load(tmp_path, dtype=torch.float16)
    ref = T5ForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float16)
    wo = [n for n, p in mine.named_parameters() if n.endswith("DenseReluDense.wo.weight")]
    assert wo and all(mine.get_parameter(n).dtype == torch.float32 for n in wo)
    assert mine.get_parameter("shared.weight").dtype == torch.float16
    _assert_same_state(mine, ref)


def test_config_dtype_and_name_or_path_updated(tmp_path) -> None:
    from transformers import LlamaForCausalLM
    save_tiny_llama(tmp_path, dtype="float32")
    mine = _load(tmp_path, dtype="bfloat16")
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert mine.config.dtype == ref.config.dtype == torch.bfloat16
    assert mine.name_or_path == ref.name_or_path == str(tmp_path)
    assert mine.config.name_or_path == ref.config.name_or_path
    out = tmp_path / "resaved"
    mine.save_pretrained(str(out))
    with open(out / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


@pytest.mark.parametrize("config_dtype", [None, "float16"])
def test_mixed_dtype_checkpoint_auto_unified_as_from_pretrained(tmp_path, config_dtype) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    save_tiny_llama(tmp_path, max_shard_size="10GB")
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    mixed = {k: (v.to(torch.bfloat16) if i % 2 else v) for i, (k, v) in enumerate(sorted(sd.items()))}
    _save_file(mixed, path)
    _edit_config(tmp_path, dtype=config_dtype)
    mine = _load(tmp_path, dtype="auto")
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype="auto")
    assert len({p.dtype for p in ref.parameters()}) == 1  # from_pretrained unifies
    _assert_same_state(mine, ref)
    assert mine.config.dtype == ref.config.dtype


def test_model_none_auto_returns_tensors_as_stored(tmp_path) -> None:
    from safetensors.torch import load_file
    save_tiny_llama(tmp_path, max_shard_size="10GB", dtype="bfloat16")
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    mixed = {k: (v.to(torch.float32) if i % 2 else v) for i, (k, v) in enumerate(sorted(sd.items()))}
    _save_file(mixed, path)
    got = _load(tmp_path, model=None, dtype="auto")
    want = load_file(str(path))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# ---------------------------------------------------------------- ties

def test_tied_config_with_trained_lm_head_is_not_overwritten(tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    save_tiny_llama(tmp_path, tied=False, max_shard_size="10GB")
    _edit_config(tmp_path, tie_word_embeddings=True)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    mine = _load(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path))
    assert torch.equal(mine.lm_head.weight, sd["lm_head.weight"])
    assert mine.lm_head.weight.data_ptr() != mine.model.embed_tokens.weight.data_ptr()
    _assert_same_state(mine, ref)


def test_lm_head_only_tied_checkpoint_ties_to_what_is_there(tmp_path) -> None:
    """A tied model saved with the lm_head key instead of the embeddings: from_pretrained
    swaps the tie (the embeddings take the stored lm_head); so does this load, strictly."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    save_tiny_llama(tmp_path, tied=True, max_shard_size="10GB")
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    sd["lm_head.weight"] = sd.pop("model.embed_tokens.weight")
    _save_file(sd, path)
    mine, info = _load(tmp_path, strict=True, output_loading_info=True)
    ref, ref_info = LlamaForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info == ref_info
    assert torch.equal(mine.model.embed_tokens.weight, sd["lm_head.weight"])
    assert mine.model.embed_tokens.weight is mine.lm_head.weight
    _assert_same_state(mine, ref)


# ---------------------------------------------------------------- generation config, classes

def test_generation_config_loaded(tmp_path) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM
    save_tiny_llama(tmp_path)
    GenerationConfig(eos_token_id=[7, 9], do_sample=True, temperature=0.6, top_p=0.9,
                     max_new_tokens=5).save_pretrained(str(tmp_path))
    mine = _load(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path))
    assert mine.generation_config.eos_token_id == [7, 9] and mine.generation_config.temperature == 0.6
    assert mine.generation_config.to_dict() == ref.generation_config.to_dict()


def test_auto_class_with_config_override(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification
    save_tiny_llama(tmp_path, tied=False)
    mine, info = _load(tmp_path, model=AutoModelForSequenceClassification, num_labels=3, strict=False,
                       output_loading_info=True)
    ref, ref_info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3,
                                                                       output_loading_info=True)
    assert type(mine) is type(ref) and mine.config.num_labels == 3 and mine.score.out_features == 3
    assert info == ref_info == {"missing_keys": {"score.weight"}, "unexpected_keys": {"lm_head.weight"},
                                "mismatched_keys": set(), "error_msgs": []}
    _assert_same_state(mine, ref, skip=("score.",))
    assert not mine.score.weight.is_meta and torch.isfinite(mine.score.weight).all()


def test_model_class_and_strict_refusal(tmp_path) -> None:
    from transformers import LlamaForSequenceClassification
    from weightcast.orchestrator.errors import ModelMismatchError
    save_tiny_llama(tmp_path, tied=False)
    with pytest.raises(ModelMismatchError, match="(?s)does not match the model.*score.weight"):
        _load(tmp_path, model=LlamaForSequenceClassification, num_labels=2)


def test_unknown_keyword_refused_with_model_none(tmp_path) -> None:
    from weightcast.orchestrator.errors import ConfigError
    save_tiny_llama(tmp_path)
    with pytest.raises(ConfigError, match="devic_map"):
        _load(tmp_path, model=None, devic_map="tp")
    with pytest.raises(ConfigError, match="num_labels"):
        _load(tmp_path, model=_Net, num_labels=3)


def test_plain_module_missing_parameter_reset_like_its_module(tmp_path) -> None:
    """A factory model (not transformers) with strict=False: the missing bias gets its module's
    reset_parameters, the loaded weight is kept, nothing stays on meta."""
    w = torch.randn(4, 3)
    _save_file({"lin.weight": w}, tmp_path / "model.safetensors")
    model, info = _load(tmp_path, model=_Net, strict=False, output_loading_info=True)
    assert info["missing_keys"] == {"lin.bias"}
    assert torch.equal(model.lin.weight, w)
    bound = 1 / 3 ** 0.5
    assert not model.lin.bias.is_meta and model.lin.bias.abs().max() <= bound


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)


# ---------------------------------------------------------------- files

def test_pickle_checkpoint_with_model(tmp_path) -> None:
    from transformers import LlamaForCausalLM
    model = save_tiny_llama(tmp_path / "st", tied=False)
    (tmp_path / "pt").mkdir()
    torch.save(model.state_dict(), str(tmp_path / "pt" / "pytorch_model.bin"))
    model.config.save_pretrained(str(tmp_path / "pt"))
    mine = _load(tmp_path / "pt", allow_pickle=True)
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path / "pt"))
    _assert_same_state(mine, ref)


def test_explicit_safetensors_file_beside_an_index(tmp_path) -> None:
    from safetensors.torch import load_file
    save_tiny_llama(tmp_path, tied=False, max_shard_size="40KB", seed=1)
    assert (tmp_path / "model.safetensors.index.json").exists()
    other = save_tiny_llama(tmp_path / "other", tied=False, max_shard_size="10GB", seed=2)
    os.rename(tmp_path / "other" / "model.safetensors", tmp_path / "model.safetensors")
    mine = _load(tmp_path / "model.safetensors")
    want = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(mine.lm_head.weight, want["lm_head.weight"])
    assert torch.equal(mine.lm_head.weight, other.lm_head.weight)


def test_wrong_index_total_size_is_a_warning(tmp_path) -> None:
    from transformers import LlamaForCausalLM
    save_tiny_llama(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    obj["metadata"]["total_size"] += 12345
    index.write_text(json.dumps(obj))
    with pytest.warns(UserWarning, match="total_size"):
        mine = _load(tmp_path)
    _assert_same_state(mine, LlamaForCausalLM.from_pretrained(str(tmp_path)))


# ---------------------------------------------------------------- remote code

_CONFIG_PY = '''
from transformers import PretrainedConfig


class WcTinyConfig(PretrainedConfig):
    model_type = "wc_tiny"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''

_MODELING_PY = '''
import torch
from transformers import PreTrainedModel

from .configuration_wc_tiny import WcTinyConfig


class WcTinyModel(PreTrainedModel):
    config_class = WcTinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.proj(x)
'''


def _remote_checkpoint(directory) -> dict:
    os.makedirs(directory, exist_ok=True)
    for name, text in (("configuration_wc_tiny.py", _CONFIG_PY), ("modeling_wc_tiny.py", _MODELING_PY)):
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    cfg = {"model_type": "wc_tiny", "width": 8, "architectures": ["WcTinyModel"],
           "auto_map": {"AutoConfig": "configuration_wc_tiny.WcTinyConfig",
                        "AutoModel": "modeling_wc_tiny.WcTinyModel"}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = {"proj.weight": torch.randn(8, 8), "proj.bias": torch.randn(8)}
    _save_file(tensors, os.path.join(directory, "model.safetensors"))
    return tensors


def test_trust_remote_code_auto_map_class(tmp_path) -> None:
    from transformers import AutoModel
    from weightcast.orchestrator.errors import RemoteCodeRefusedError
    tensors = _remote_checkpoint(tmp_path)
    with pytest.raises(RemoteCodeRefusedError):
        _load(tmp_path)
    mine = _load(tmp_path, trust_remote_code=True)
    ref = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(mine).__name__ == type(ref).__name__ == "WcTinyModel"
    assert torch.equal(mine.proj.weight, tensors["proj.weight"])
    _assert_same_state(mine, ref)


def test_native_model_type_with_auto_map_not_refused(tmp_path) -> None:
    from transformers import LlamaForCausalLM
    save_tiny_llama(tmp_path)
    _edit_config(tmp_path, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLlama"})
    mine = _load(tmp_path)
    assert type(mine) is LlamaForCausalLM
    _assert_same_state(mine, LlamaForCausalLM.from_pretrained(str(tmp_path)))


# ---------------------------------------------------------------- device maps

def test_balanced_low_0_leaves_rank_0_the_overflow_only(tmp_path) -> None:
    from weightcast.orchestrator.checkpoint import load_index
    from weightcast.orchestrator.cluster import cluster_from_facts
    from weightcast.orchestrator.device_map import build_device_map
    save_tiny_llama(tmp_path, max_shard_size="40KB")
    index = load_index(str(tmp_path))
    facts = [{"rank": r, "local_rank": r, "host": "n0", "device": "cpu", "device_memory": 1 << 30,
              "host_memory": 8 << 30} for r in range(3)]
    cluster = cluster_from_facts(facts)
    dm = build_device_map(index, cluster, "balanced_low_0", config=json.loads((tmp_path / "config.json").read_text()))
    ranks = {p.rank for p in dm.placements.values()}
    assert ranks == {1, 2}, ranks
    tight = build_device_map(index, cluster, "balanced_low_0", max_memory={1: index.total_bytes // 3,
                                                                           2: index.total_bytes // 3})
    assert 0 in {p.rank for p in tight.placements.values()}
    assert dm.strategy == "balanced_low_0"


def test_f4_checkpoint_refused_with_reason(tmp_path) -> None:
    """safetensors reads F4 (float4 e2m1, two per byte) as torch.float4_e2m1fn_x2 with the last
    dimension halved; this loader refuses it at planning with a reason instead of mis-viewing it."""
    from safetensors.torch import load_file
    from tests.ckpt_factory import write_raw
    from weightcast.orchestrator.errors import CheckpointFormatError
    from weightcast.orchestrator.safetensors_format import DTYPE_BITS
    if "F4" not in DTYPE_BITS:
        pytest.skip("the installed safetensors does not know F4")
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F4", "shape": [4, 8], "data_offsets": [0, 16]}}
    write_raw(tmp_path / "model.safetensors", header, bytes(range(16)))
    assert load_file(str(tmp_path / "model.safetensors"))["w"].shape == (4, 4)
    with pytest.raises(CheckpointFormatError, match="sub-byte dtype F4.*tensor 'w'"):
        _load(tmp_path, model=None)


def test_loading_report_warns_on_rank_0_and_tuple_order(tmp_path, caplog) -> None:
    """Without output_loading_info a non-strict load that left keys missing / unexpected logs one
    warning naming them; with return_report too the result is (model, loading_info, report)."""
    import logging
    from transformers import AutoModelForSequenceClassification
    save_tiny_llama(tmp_path, tied=False)
    with caplog.at_level(logging.WARNING, logger="weightcast"):
        _load(tmp_path, model=AutoModelForSequenceClassification, num_labels=2, strict=False)
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "weightcast")
    assert "score.weight" in text and "lm_head.weight" in text, text
    model, info, report = _load(tmp_path, model=AutoModelForSequenceClassification, num_labels=2, strict=False,
                                output_loading_info=True, return_report=True, report_memory=False)
    assert info["missing_keys"] == {"score.weight"} and report["ranks"][0]["owned_bytes"] > 0


def test_auto_dtype_from_index_metadata_as_from_pretrained(tmp_path) -> None:
    """No dtype in config.json, a ``dtype`` in the index metadata: from_pretrained takes the index's."""
    from transformers import LlamaForCausalLM
    save_tiny_llama(tmp_path, max_shard_size="40KB")
    _edit_config(tmp_path, dtype=None)
    index = tmp_path / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    obj["metadata"]["dtype"] = "bfloat16"
    index.write_text(json.dumps(obj))
    mine = _load(tmp_path, dtype="auto")
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype="auto")
    assert ref.model.embed_tokens.weight.dtype == torch.bfloat16
    _assert_same_state(mine, ref)


def test_model_class_brings_its_own_config_class(tmp_path) -> None:
    """A model class whose config class differs from config.json's model_type builds its own
    config from config.json, as Cls.from_pretrained does (a Llama save into Mistral)."""
    from transformers import MistralConfig, MistralForCausalLM
    save_tiny_llama(tmp_path, tied=False)
    mine = _load(tmp_path, model=MistralForCausalLM)
    ref = MistralForCausalLM.from_pretrained(str(tmp_path))
    assert type(mine.config) is type(ref.config) is MistralConfig
    _assert_same_state(mine, ref)


def test_ignore_mismatched_sizes_reinitialises_the_head(tmp_path) -> None:
    """A 3-label classifier save loaded with num_labels=5: refused by default (from_pretrained
    raises too); with ignore_mismatched_sizes=True the head is initialised anew and reported."""
    from transformers import BertConfig, BertForSequenceClassification
    from weightcast.orchestrator.errors import ModelMismatchError
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=128, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ModelMismatchError, match="(?s)classifier.*ignore_mismatched_sizes=True"):
        _load(tmp_path, num_labels=5)
    mine, info = _load(tmp_path, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    ref, ref_info = BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=5,
                                                                  ignore_mismatched_sizes=True,
                                                                  output_loading_info=True)
    assert info == ref_info and {k[0] for k in info["mismatched_keys"]} == {"classifier.weight", "classifier.bias"}
    assert mine.classifier.weight.shape == (5, 32) and torch.isfinite(mine.classifier.weight).all()
    assert torch.equal(mine.classifier.bias, torch.zeros(5))
    _assert_same_state(mine, ref, skip=("classifier.",))


def test_load_leaves_the_callers_random_stream_alone(tmp_path) -> None:
    """Initialising a new head draws from a seed derived from the caller's generator without
    advancing it: the same seed gives the same head, and the stream after the load is unchanged."""
    from transformers import AutoModelForSequenceClassification
    save_tiny_llama(tmp_path, tied=False)
    heads = []
    for _ in range(2):
        torch.manual_seed(7)
        model = _load(tmp_path, model=AutoModelForSequenceClassification, num_labels=2, strict=False)
        heads.append(model.score.weight.detach().clone())
        after = torch.rand(3)
        torch.manual_seed(7)
        assert torch.equal(after, torch.rand(3))
    assert torch.equal(heads[0], heads[1])
