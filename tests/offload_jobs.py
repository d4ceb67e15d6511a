"""Rank function for the offload test (run in local ranks through launch.local.spawn): a Llama
loaded with device_map="auto" under max_memory budgets small enough that the last modules go to
the last rank's disk, run as a pipeline over the ranks (offloaded modules read back by their hooks)."""
from __future__ import annotations

import torch
import torch.distributed as dist

IDS = [[3, 17, 42, 99, 7, 120, 1, 64]]


def _holds(module: torch.nn.Module) -> bool:
    """This rank runs ``module``: its parameters are here, or an offload hook brings them."""
    params = list(module.parameters())
    offloaded = any(hasattr(m, "_hf_hook") for m in module.modules())
    return bool(params) and (offloaded or all(not p.is_meta for p in params))


def _stage(inner, stage, i: int, ids, h):
    if i == 0:
        return stage(ids)
    if stage in list(inner.layers):
        position_ids = torch.arange(ids.shape[1])[None]
        out = stage(h, attention_mask=None, position_ids=position_ids,
                    position_embeddings=inner.rotary_emb(h, position_ids))
        return out[0] if isinstance(out, tuple) else out
    return stage(h)


def offload_pipeline(args: dict) -> dict:
    from transformers import LlamaForCausalLM
    from weightcast.workers.api import load_pretrained
    model = load_pretrained(args["source"], model="auto", device_map="auto", max_memory=args["max_memory"],
                            progress=False, timeout=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    inner = model.model
    stages = [inner.embed_tokens, *inner.layers, inner.norm, model.lm_head]
    flags = torch.tensor([int(_holds(s)) for s in stages])
    everyone = [torch.zeros_like(flags) for _ in range(world)]
    dist.all_gather(everyone, flags)
    owners = [min(r for r in range(world) if everyone[r][i]) for i in range(len(stages))]
    ids, h = torch.tensor(IDS), None
    with torch.no_grad():
        for i, stage in enumerate(stages):
            owner, prev = owners[i], owners[i - 1] if i else owners[0]
            if owner != prev:
                if rank == prev:
                    dist.send(h.contiguous(), owner)
                elif rank == owner:
                    h = torch.empty(args["hidden_shape"])
                    dist.recv(h, prev)
            if rank == owner:
                h = _stage(inner, stage, i, ids, h)
    resident = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters() if not p.is_meta}
    offloaded = [n for n, p in model.named_parameters() if p.is_meta
                 and hasattr(model.get_submodule(n.rpartition(".")[0]), "_hf_hook")]
    out = {"owners": owners, "resident_bytes": sum(resident.values()), "offloaded": offloaded,
           "hf_device_map": model.hf_device_map}
    if rank == owners[-1]:
        ref = LlamaForCausalLM.from_pretrained(args["source"])(ids).logits
        out.update(equal=bool(torch.equal(h, ref)), max_diff=float((h - ref).abs().max()))
    return out
