"""Rank function for the offload test (run in local ranks through launch.local.spawn): a Llama
loaded with device_map="auto" under max_memory budgets small enough that the last modules go to
the last rank's disk, run as a pipeline over the ranks (offloaded modules read back by their hooks)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.model_jobs import IDS, run_pipeline


def _holds(module: torch.nn.Module) -> bool:
    """This rank runs ``module``: its parameters are here, or an offload hook brings them."""
    params = list(module.parameters())
    offloaded = any(hasattr(m, "_hf_hook") for m in module.modules())
    return bool(params) and (offloaded or all(not p.is_meta for p in params))


def offload_pipeline(args: dict) -> dict:
    from transformers import LlamaForCausalLM
    from weightcast.workers.api import load_pretrained
    model = load_pretrained(args["source"], model="auto", device_map="auto", max_memory=args["max_memory"],
                            progress=False, timeout=120)
    owners, h = run_pipeline(model, _holds, args["hidden_shape"], torch.float32)
    resident = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters() if not p.is_meta}
    offloaded = [n for n, p in model.named_parameters() if p.is_meta
                 and hasattr(model.get_submodule(n.rpartition(".")[0]), "_hf_hook")]
    out = {"owners": owners, "resident_bytes": sum(resident.values()), "offloaded": offloaded,
           "hf_device_map": model.hf_device_map}
    if dist.get_rank() == owners[-1]:
        ref = LlamaForCausalLM.from_pretrained(args["source"])(torch.tensor(IDS)).logits
        out.update(equal=bool(torch.equal(h, ref)), max_diff=float((h - ref).abs().max()))
    return out
