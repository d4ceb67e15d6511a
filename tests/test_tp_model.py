"""Tensor-parallel models: a tiny Llama whose weights are split over 2 ranks (DTensors of a
``parallelize_module``-d skeleton) gives the logits of the unsharded model."""
from __future__ import annotations

import os

import pytest

from tests.ckpt_factory import save_tiny_llama
from tests.test_torchrun import torchrun

pytestmark = pytest.mark.timeout(400)

EXAMPLE = os.path.join("examples", "torchrun_tp.py")


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tp over 2 ranks" in proc.stdout and "(same)" in proc.stdout, proc.stdout


def test_tp_logits_equal_unsharded(tmp_path) -> None:
    save_tiny_llama(tmp_path / "llama", tied=False, max_shard_size="60KB")
    _check(torchrun([EXAMPLE, str(tmp_path / "llama")]))


def test_tp_uneven_splits_and_tied_embeddings(tmp_path) -> None:
    """Vocabulary 255 and MLP width 127 split 128/127 and 64/63 (torch.chunk), lm_head tied."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    config = LlamaConfig(hidden_size=32, intermediate_size=127, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=255, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "odd", max_shard_size="50KB")
    _check(torchrun([EXAMPLE, str(tmp_path / "odd")]))


def test_module_styles_follow_the_device_map() -> None:
    """Linear split on dim 0 -> Colwise, dim 1 -> Rowwise, Embedding by vocabulary -> Rowwise with a
    replicated input, the output embeddings -> Colwise gathering the logits."""
    import torch
    from torch.distributed.tensor import Replicate as TReplicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from weightcast.orchestrator.device_map import ClusterDeviceMap, Replicate, Shard
    from weightcast.workers.tp import module_styles

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4)
            self.up = torch.nn.Linear(4, 6)
            self.odd = torch.nn.Linear(4, 5)
            self.down = torch.nn.Linear(6, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.head = torch.nn.Linear(4, 8, bias=False)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

    groups = ((0, 1),)
    dm = ClusterDeviceMap({"embed.weight": Shard(0, groups), "up.weight": Shard(0, groups),
                           "up.bias": Shard(0, groups), "odd.weight": Shard(0, groups), "odd.bias": Shard(0, groups),
                           "down.weight": Shard(1, groups),
                           "down.bias": Replicate((0, 1)), "norm.weight": Replicate((0, 1)),
                           "norm.bias": Replicate((0, 1))},
                          "tp", tied=(("embed.weight", "head.weight"),))
    with torch.device("meta"):
        model = Tiny()
    styles = module_styles(model, dm, {"head.weight": "embed.weight"})
    assert set(styles) == {"embed", "up", "odd", "down", "head"}
    assert isinstance(styles["embed"], RowwiseParallel) and styles["embed"].input_layouts == (TReplicate(),)
    assert isinstance(styles["up"], ColwiseParallel) and styles["up"].use_local_output  # 6 rows: even
    assert isinstance(styles["odd"], ColwiseParallel) and not styles["odd"].use_local_output  # 3 + 2 rows
    assert isinstance(styles["down"], RowwiseParallel)
    assert isinstance(styles["head"], ColwiseParallel) and styles["head"].output_layouts == (TReplicate(),)
