"""Rank functions for the MoE / key-mapping tests (run in local ranks through launch.local.spawn)."""
from __future__ import annotations

import torch
import torch.distributed as dist

IDS = [[3, 17, 42, 99, 7, 120, 1, 64]]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor(IDS))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _reference(source: str, cls_name: str):
    import transformers
    return getattr(transformers, cls_name).from_pretrained(source, dtype="auto")


def replicate_vs_from_pretrained(args: dict) -> dict:
    """Every rank: weightcast ``replicate`` load vs ``from_pretrained`` in this process: logits bit for
    bit, state dict keys and tensors, what this rank read from storage."""
    from weightcast.workers.api import load_pretrained
    model, report = load_pretrained(args["source"], model="auto", device_map="replicate", dtype="auto",
                                    return_report=True, report_memory=False, progress=False, timeout=120)
    ref = _reference(args["source"], args["cls"])
    mine, theirs = model.state_dict(), ref.state_dict()
    differ = [k for k in theirs if k in mine and not torch.equal(mine[k], theirs[k])]
    a, b = _logits(model), _logits(ref)
    return {"equal": bool(torch.equal(a, b)), "max_diff": float((a.float() - b.float()).abs().max()),
            "keys_equal": list(mine) == list(theirs), "differ": differ[:5],
            "meta": [n for n, p in model.named_parameters() if p.is_meta], "type": type(model).__name__,
            "read": [r["read_bytes"] for r in report["ranks"]], "checkpoint": report["checkpoint_bytes"],
            "rank": dist.get_rank()}


def _local_layout(model) -> dict:
    from torch.distributed.tensor import DTensor
    out = {}
    for n, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        out[n] = [list(local.shape), str(getattr(p, "placements", "")), str(local.dtype)]
    return out


def _param_bytes(model) -> int:
    from torch.distributed.tensor import DTensor
    seen, total = set(), 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.data_ptr() not in seen:
            seen.add(local.data_ptr())
            total += local.numel() * local.element_size()
    return total


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _keys(info: dict) -> dict:
    """A loading-info dict's key sets, comparable across processes."""
    return {k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def tp_vs_from_pretrained(args: dict) -> dict:
    """Every rank: weightcast ``tp`` (the model's own plan) vs transformers' ``from_pretrained``
    with the same DistributedConfig (per-rank layout, logits) and unsharded (logits)."""
    import transformers
    from transformers.distributed import DistributedConfig
    from weightcast.workers.api import load_pretrained
    model, info, report = load_pretrained(args["source"], model="auto", device_map="tp", dtype="auto",
                                          output_loading_info=True, return_report=True, report_memory=False,
                                          progress=False, timeout=120)
    world = dist.get_world_size()
    cls = getattr(transformers, args["cls"])
    ep = world if model.ep_plan else 1
    ref_tp, ref_info = cls.from_pretrained(args["source"], dtype="auto", output_loading_info=True,
                                           distributed_config=DistributedConfig(tp_size=world, ep_size=ep))
    whole = cls.from_pretrained(args["source"], dtype="auto")
    a, b, c = _full(_logits(model)), _full(_logits(ref_tp)), _logits(whole)
    mine, theirs = _local_layout(model), _local_layout(ref_tp)
    experts = [v[0][0] for k, v in mine.items() if k.endswith("experts.gate_up_proj")]
    return {"vs_whole": float((a - c).abs().max()), "vs_hf_tp": float((a - b).abs().max()),
            "info": _keys(info), "ref_info": _keys(ref_info), "layout_equal": mine == theirs, "layout_diff": {k: (mine.get(k), theirs.get(k)) for k in theirs
                                                           if mine.get(k) != theirs[k]},
            "param_bytes": _param_bytes(model), "whole_bytes": _param_bytes(whole),
            "local_experts": experts, "meta": [n for n, p in model.named_parameters() if p.is_meta],
            "read": [r["read_bytes"] for r in report["ranks"]], "checkpoint": report["checkpoint_bytes"]}


def auto_vs_from_pretrained(args: dict) -> dict:
    """Every rank: ``device_map="auto"`` over the ranks; what this rank holds equals
    from_pretrained's, and which fused expert parameters it holds."""
    from weightcast.workers.api import load_pretrained
    model = load_pretrained(args["source"], model="auto", device_map="auto", dtype="auto",
                            max_memory=args["max_memory"], progress=False, timeout=120)
    ref = _reference(args["source"], args["cls"]).state_dict()
    held = {n: p for n, p in model.state_dict().items() if not p.is_meta}
    return {"experts": sorted(n for n in held if ".experts." in n),
            "differ": [n for n, p in held.items() if not torch.equal(p, ref[n])],
            "held": len(held), "total": len(ref)}


def zoo_checks(args: dict) -> dict:
    """Every rank: the ``replicate`` checks, then the ``tp`` checks, in one process."""
    return {"replicate": replicate_vs_from_pretrained(args), "tp": tp_vs_from_pretrained(args)}
