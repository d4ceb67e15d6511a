"""Rank functions for the model tests (run in local ranks through launch.local.spawn)."""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist

IDS = [[3, 17, 42, 99, 7, 120, 1, 64]]


def _reference_logits(source: str, cls_name: str) -> torch.Tensor:
    import transformers
    model = getattr(transformers, cls_name).from_pretrained(source, dtype="auto")
    return _forward(model, cls_name)


def _forward(model, cls_name: str) -> torch.Tensor:
    ids = torch.tensor(IDS)
    with torch.no_grad():
        out = model(ids)
    return out.logits if cls_name.endswith("CausalLM") else out.last_hidden_state


def replicate_logits(args: dict) -> dict:
    """Every rank: load with weightcast (replicate) and compare with from_pretrained, bit for bit."""
    from weightcast.workers.api import load_pretrained
    model = load_pretrained(args["source"], model="auto", device_map="replicate", dtype="auto",
                            transport=args.get("transport", "auto"), timeout=60)
    mine = _forward(model, args["cls"])
    ref = _reference_logits(args["source"], args["cls"])
    return {"equal": bool(torch.equal(mine, ref)), "max_diff": float((mine.float() - ref.float()).abs().max()),
            "dtype": str(next(model.parameters()).dtype), "ref_dtype": str(ref.dtype),
            "meta": [n for n, p in model.named_parameters() if p.is_meta]}


def _owns(module: torch.nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(not p.is_meta for p in params)


def pipeline_logits(args: dict) -> dict:
    """Load a Llama with device_map="auto" over the ranks and run it as a pipeline: each stage
    (embeddings, each layer, norm, head) on the rank that owns it, hidden states sent between
    ranks. Rank 0 compares the result with from_pretrained in one process."""
    from weightcast.workers.api import load_pretrained
    model = load_pretrained(args["source"], model="auto", device_map="auto", dtype="auto",
                            max_memory=args.get("max_memory"), timeout=60)
    owners, h = run_pipeline(model, _owns, args["shape"], getattr(torch, args["dtype"]))
    rank, last = dist.get_rank(), owners[-1]
    result = {"owners": owners, "hf_device_map": getattr(model, "hf_device_map", None)}
    if rank == last and rank != 0:
        dist.send(h.contiguous(), 0)
    if rank == 0:
        if last != 0:
            h = torch.empty(args["logits_shape"], dtype=getattr(torch, args["dtype"]))
            dist.recv(h, last)
        ref = _reference_logits(args["source"], "LlamaForCausalLM")
        result.update(equal=bool(torch.equal(h, ref)), max_diff=float((h.float() - ref.float()).abs().max()))
    return result


def run_pipeline(model: torch.nn.Module, holds: Callable[[torch.nn.Module], bool], hidden_shape: list[int],
                 dtype: torch.dtype) -> tuple[list[int], torch.Tensor | None]:
    """Every rank (collective): run a Llama as a pipeline over the ranks on ``IDS``: each stage
    (embeddings, each layer, norm, head) on the lowest rank that ``holds`` it, hidden states
    (``hidden_shape``, ``dtype``) sent between ranks. -> the owner of each stage, and this rank's
    last output (the logits on the rank owning the head)."""
    inner = model.model
    stages = [inner.embed_tokens, *inner.layers, inner.norm, model.lm_head]
    flags = torch.tensor([int(holds(s)) for s in stages], dtype=torch.int64)
    world, rank = dist.get_world_size(), dist.get_rank()
    everyone = [torch.zeros_like(flags) for _ in range(world)]
    dist.all_gather(everyone, flags)
    owners = [min(r for r in range(world) if everyone[r][i]) for i in range(len(stages))]
    ids = torch.tensor(IDS)
    position_ids = torch.arange(ids.shape[1])[None]
    h = None
    with torch.no_grad():
        for i, stage in enumerate(stages):
            owner, prev = owners[i], owners[i - 1] if i else owners[0]
            if owner != prev:
                if rank == prev:
                    dist.send(h.contiguous(), owner)
                elif rank == owner:
                    h = torch.empty(hidden_shape, dtype=dtype)
                    dist.recv(h, prev)
            if rank == owner:
                h = _run_stage(inner, stage, i, ids, position_ids, h)
    return owners, h


def _run_stage(inner, stage, i: int, ids, position_ids, h):
    if i == 0:
        return stage(ids)
    if stage in list(inner.layers):
        pos = inner.rotary_emb(h, position_ids)
        out = stage(h, attention_mask=None, position_ids=position_ids, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out
    return stage(h)


def no_init_load(args: dict) -> dict:
    """Load with every torch.nn.init function and reset_parameters guarded: any of them running
    on a real (non-meta) tensor fails the load."""
    import torch.nn.init as init
    from weightcast.workers.api import load_pretrained
    from weightcast.workers.materialize import guard_no_init
    calls: list[str] = []
    for name in dir(init):
        fn = getattr(init, name)
        if callable(fn) and name.endswith("_") and not name.startswith("_"):
            setattr(init, name, guard_no_init(fn))

    def forbid(self, *a, **k):
        calls.append(type(self).__name__)
        raise AssertionError(f"reset_parameters ran on {type(self).__name__}")
    for cls in (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm):
        cls.reset_parameters = forbid
    model = load_pretrained(args["source"], model="auto", timeout=60)
    return {"calls": calls, "meta": [n for n, p in model.named_parameters() if p.is_meta],
            "n_params": sum(1 for _ in model.parameters())}


def tp_memory(args: dict) -> dict:
    """TP over the ranks: private memory growth of this rank vs what it owns."""
    from weightcast.workers.api import load_pretrained
    from weightcast.workers.report import memory_now
    before = memory_now()
    sd, report = load_pretrained(args["source"], model=None, device_map="tp", return_report=True, timeout=60)
    rank = dist.get_rank()
    me = report["ranks"][rank]
    return {"owned": me["owned_bytes"], "private_growth": me["private_bytes"] - before["private_bytes"],
            "checkpoint": report["checkpoint_bytes"], "pid": os.getpid()}
