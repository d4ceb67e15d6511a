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
