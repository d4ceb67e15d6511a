"""A real transformers ``Trainer`` on a tiny Llama (CPU, gloo), run under torchrun by the tests.

``python -m torch.distributed.run --nproc-per-node 2 tests/trainer_run.py MODE OUT [CHECKPOINT]``
- ``train``: 3 steps, a checkpoint every 2 steps (``OUT/checkpoint-2``);
- ``resume``: Trainer's own resume of CHECKPOINT to step 3;
- ``resume-weightcast``: the same through ``weightcast.launch.trainer.WeightcastTrainer``.
Each rank writes ``OUT/losses_<rank>.json`` (the logged loss of every step).
"""
from __future__ import annotations

import json
import os
import sys

import torch


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=127, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=255, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 255, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out: str, **kw):
    from transformers import TrainingArguments
    return TrainingArguments(output_dir=out, use_cpu=True, ddp_backend="gloo", report_to=[], max_steps=3,
                             save_steps=2, logging_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                             seed=0, dataloader_num_workers=0, disable_tqdm=True, **kw)


def main(mode: str, out: str, checkpoint: str | None = None) -> None:
    from transformers import Trainer
    cls = Trainer
    if mode == "resume-weightcast":
        from weightcast.launch.trainer import WeightcastTrainer
        cls = WeightcastTrainer
    trainer = cls(model=tiny_model(), args=arguments(out), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=checkpoint if mode != "train" else None)
    losses = {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e}
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"losses_{rank}.json"), "w") as f:
        json.dump({"losses": losses, "weightcast": getattr(trainer, "weightcast_reports", None)}, f)
    import torch.distributed as dist
    if dist.is_initialized():  # gloo's threads joined now, not by destructors at interpreter exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
