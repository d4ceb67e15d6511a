"""Ray actors with ``device_map="auto"``: the model's layers are spread over the ranks, and a
forward pass runs as a pipeline across the actors.

    python examples/ray_actors_auto.py demo_checkpoint --ranks 2

(run from the repository root after ``make demo``; it starts a local Ray instance, or joins the
cluster named by ``RAY_ADDRESS``). ``wc.load_on_ray`` starts one actor per rank; each
loads only the modules the cluster-wide map gives it (embeddings and the first layers on rank 0,
the rest on rank 1, ...), read from storage once. :func:`pipeline_forward` then runs on every
actor at once: each computes its stages in model order and hands the hidden states to the owner
of the next stage over the actors' process group (``torch.distributed`` send / recv). The logits
equal the unsharded model's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import weightcast as wc  # importing weightcast does not import torch


def llama_stages(model: Any) -> list[tuple[str, Any]]:
    """The modules of a Llama-style causal LM in forward order."""
    base = model.model
    return ([("embed_tokens", base.embed_tokens)] + [(f"layers.{i}", m) for i, m in enumerate(base.layers)]
            + [("norm", base.norm), ("lm_head", model.lm_head)])


def held_stages(model: Any) -> list[str]:
    """On a rank: the stages whose parameters this rank holds (the others stay on meta)."""
    return [name for name, m in llama_stages(model) if all(not p.is_meta for p in m.parameters())]


def pipeline_forward(model: Any, input_ids: Any) -> Any:
    """On every rank at once (collective): a forward pass through the stages, each on its owner;
    returns the logits on the rank holding ``lm_head``, None elsewhere."""
    import torch
    import torch.distributed as dist
    stages = llama_stages(model)
    mine = [all(not p.is_meta for p in m.parameters()) for _, m in stages]
    owners: list = [None] * dist.get_world_size()
    dist.all_gather_object(owners, mine)
    owner = [next(r for r, held in enumerate(owners) if held[i]) for i in range(len(stages))]
    rank = dist.get_rank()
    batch, length = input_ids.shape
    positions = torch.arange(length).unsqueeze(0)
    h, cos_sin, out = None, None, None
    with torch.no_grad():
        for i, (name, module) in enumerate(stages):
            if owner[i] != rank:
                continue
            if i > 0 and owner[i - 1] != rank:  # the previous stage ran elsewhere: receive its output
                h = torch.empty(batch, length, model.config.hidden_size, dtype=next(module.parameters()).dtype)
                dist.recv(h, src=owner[i - 1])
            if name == "embed_tokens":
                h = module(input_ids)
            elif name.startswith("layers."):
                cos_sin = cos_sin or model.model.rotary_emb(h, position_ids=positions)
                h = module(h, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
            else:
                h = module(h)
            if i + 1 < len(stages) and owner[i + 1] != rank:
                dist.send(h.contiguous(), dst=owner[i + 1])
            out = h if name == "lm_head" else out
    return out


def sample_ids(source: str, batch: int = 2, length: int = 10) -> Any:
    import torch
    with open(os.path.join(source, "config.json")) as fh:
        vocab = json.load(fh)["vocab_size"]
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def run_example(source: str, ranks: int = 2, timeout: float = 300.0) -> dict:
    """Driver (Ray initialised): load over ``ranks`` actors with ``auto``, run the pipeline,
    compare with ``transformers``' unsharded model; returns what it found."""
    import torch
    from transformers import AutoModelForCausalLM
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors need not import examples/
    source = os.path.abspath(source)
    ids = sample_ids(source)
    with wc.load_on_ray(source, ranks_per_node=ranks, model="auto", device_map="auto", dtype="float32",
                     timeout=timeout) as group:
        held = group.run(held_stages)
        logits = next(x for x in group.run(pipeline_forward, ids) if x is not None)
        read = group.report["total_read_bytes"]
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    return {"held": held, "max_diff": (logits - expected).abs().max().item(),
            "same": bool(torch.allclose(logits, expected, atol=1e-5, rtol=0)), "read_bytes": read,
            "seconds": group.seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint directory of a Llama-style model")
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args(argv)
    import ray
    ray.init()
    try:
        found = run_example(args.source, args.ranks)
    finally:
        ray.shutdown()
    for rank, stages in enumerate(found["held"]):
        print(f"rank {rank} holds {', '.join(stages)}")
    print(f"pipeline over {args.ranks} Ray actors: max |pipelined - unsharded| = {found['max_diff']:.3g} "
          f"({'same' if found['same'] else 'DIFFERENT'}); loaded in {found['seconds']:.2f} s")
    return 0 if found["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
