"""A plain FSDP2 training loop under torchrun: start from a pretrained checkpoint with
``device_map="fsdp"``, save with ``save_training_state``, resume with ``load_training_state``.

    torchrun --standalone --nproc-per-node 2 examples/torchrun_fsdp_train.py demo_checkpoint runs/fsdp --steps 4
    torchrun --standalone --nproc-per-node 2 examples/torchrun_fsdp_train.py demo_checkpoint runs/fsdp --steps 4 \\
        --resume runs/fsdp/checkpoint-4

Each rank reads only its rows of every weight (and, on resume, of every optimizer state): the
model comes back wrapped with ``fully_shard`` per decoder layer and on the root, parameters
``Shard(0)`` DTensors. Every ``--save-every`` steps the job writes a Trainer-layout checkpoint
(``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state_<rank>.pth``,
``trainer_state.json``), each rank writing its own rows into ``optimizer.pt``. Rank 0 prints
one line per step: ``step N loss L``.
"""
from __future__ import annotations

import argparse
import os

import weightcast as wc  # importing weightcast does not import torch


def batch(vocab: int, step: int, size: int = 4, length: int = 16):
    """The batch of ``step``: the same on every run, different per rank (data parallel)."""
    import torch
    g = torch.Generator().manual_seed(1000 * step + int(os.environ.get("RANK", "0")))
    ids = torch.randint(0, vocab, (size, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a pretrained checkpoint (local directory or hub id)")
    parser.add_argument("out", help="where checkpoint-N directories are written")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--resume", help="a checkpoint-N directory to resume from")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    import torch
    source = args.resume or args.source
    model = wc.load_pretrained(source, device_map="fsdp", dtype="float32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (args.steps + 1))
    step = 0
    if args.resume:
        state = wc.load_training_state(args.resume, model, optimizer, scheduler, weights=False)
        step = int(state.get("global_step", 0))
    model.train()
    vocab = model.config.vocab_size
    while step < args.steps:
        loss = model(**batch(vocab, step)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"step {step} loss {loss.item():.6f}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            wc.save_training_state(os.path.join(args.out, f"checkpoint-{step}"), model, optimizer, scheduler,
                                   trainer_state={"global_step": step})


if __name__ == "__main__":
    main()
