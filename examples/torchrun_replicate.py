"""Data parallelism under torchrun: every rank gets the whole model, the checkpoint is read once.

    torchrun --standalone --nproc-per-node 2 examples/torchrun_replicate.py demo_checkpoint

Each rank loads with ``device_map="replicate"`` (the ranks read disjoint parts of the checkpoint
and share them; storage sees each byte once), evaluates the language-model loss on its own
batch, and the ranks average it with ``all_reduce``. Rank 0 prints the load report and the loss,
and exits 1 if storage served more bytes than the checkpoint holds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import weightcast as wc  # importing weightcast does not import torch


def rank_batch(source: str, rank: int, batch: int = 2, length: int = 16):
    """Token ids of this rank's batch (a different seed per rank: data parallel)."""
    import torch
    with open(os.path.join(source, "config.json")) as fh:
        vocab = json.load(fh)["vocab_size"]
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, vocab, (batch, length), generator=g)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint directory of a causal language model")
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist
    model, report = wc.load_pretrained(args.source, model="auto", device_map="replicate", return_report=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = rank_batch(args.source, rank)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.detach().float().reshape(1)
    dist.all_reduce(loss)
    status = 0
    if rank == 0:
        read, total = report["total_read_bytes"], report["checkpoint_bytes"]
        status = 0 if read == total else 1
        print(f"{world} ranks each hold the whole model; storage served {read:,} bytes "
              f"for a {total:,}-byte checkpoint; load {report['wall_seconds']:.3f} s")
        print(f"mean loss over {world} data-parallel batches: {loss.item() / world:.4f}")
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
