"""Tensor parallelism under torchrun: a model whose weights are split over the ranks gives the
logits of the whole model.

    torchrun --standalone --nproc-per-node 2 examples/torchrun_tp.py demo_checkpoint

Every rank loads only its slices (``device_map="tp"``: attention and MLP projections split
column- or row-wise, embeddings and ``lm_head`` by vocabulary), as DTensors of a model
parallelized with ``torch.distributed.tensor.parallel``. All ranks run the same forward pass;
rank 0 compares the logits with the unsharded model loaded by ``transformers`` and exits 1 if
they differ.
"""
from __future__ import annotations

import argparse
import os
import sys

import weightcast as wc  # importing weightcast does not import torch


def sharded_logits(source: str, input_ids, timeout: float = 300.0):
    """Every rank (collective): load ``source`` tensor-parallel and return the logits."""
    import torch
    model = wc.load_pretrained(source, model="auto", device_map="tp", dtype="float32", timeout=timeout)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def reference_logits(source: str, input_ids):
    """One process: the unsharded model's logits (``transformers.from_pretrained``)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def sample_ids(source: str, batch: int = 2, length: int = 12):
    import json
    import torch
    with open(os.path.join(source, "config.json")) as fh:
        vocab = json.load(fh)["vocab_size"]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, length), generator=g)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint directory of a Llama-style model")
    p.add_argument("--atol", type=float, default=1e-5)
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist
    ids = sample_ids(args.source)
    logits = sharded_logits(args.source, ids)
    status = 0
    if dist.get_rank() == 0:
        ref = reference_logits(args.source, ids)
        diff = (logits - ref).abs().max().item()
        status = 0 if torch.allclose(logits, ref, atol=args.atol, rtol=0) else 1
        print(f"tp over {dist.get_world_size()} ranks: logits {tuple(logits.shape)}, "
              f"max |sharded - unsharded| = {diff:.3g} ({'same' if status == 0 else 'DIFFERENT'})")
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
