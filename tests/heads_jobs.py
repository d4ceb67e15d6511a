"""Rank functions for the task-head tests (run in local ranks through launch.local.spawn).

Each case loads one checkpoint into another task's class with weightcast and with
``from_pretrained`` in the same process, and reports what the test compares: the loading info,
whether the body is identical, the new parameters' statistics and a digest of their bytes (the
digests of every rank must agree), or the class of the error a strict load raised.
"""
from __future__ import annotations

import hashlib

import torch


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _stats(t: torch.Tensor) -> dict:
    t = t.detach().float()
    return {"mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0,
            "finite": bool(torch.isfinite(t).all()), "numel": t.numel()}


def _one_case(case: dict) -> dict:
    import transformers
    from weightcast.workers.api import load_pretrained
    cls = getattr(transformers, case["cls"])
    kwargs = case.get("kwargs", {})
    try:
        model, info = load_pretrained(case["source"], model=cls, strict=case["strict"], output_loading_info=True,
                                      progress=False, timeout=120, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test checks the class that reached the caller
        return {"error": type(exc).__name__, "message": str(exc)[:2000]}
    ref, ref_info = cls.from_pretrained(case["source"], output_loading_info=True, **kwargs)
    mine, theirs = model.state_dict(), ref.state_dict()
    new = sorted(info["missing_keys"])
    body = [k for k in theirs if k not in info["missing_keys"]]
    return {
        "type": type(model).__name__, "ref_type": type(ref).__name__,
        "info": {k: sorted(map(str, v)) for k, v in info.items()},
        "ref_info": {k: sorted(map(str, v)) for k, v in ref_info.items()},
        "same_keys": sorted(mine) == sorted(theirs),
        "body_equal": all(torch.equal(mine[k], theirs[k]) for k in body),
        "meta": [n for n, t in mine.items() if t.is_meta],
        "new": {k: _stats(mine[k]) for k in new}, "ref_new": {k: _stats(theirs[k]) for k in new},
        "digest": _digest([mine[k] for k in new]),
    }


def task_heads(args: dict) -> list[dict]:
    """Every rank: each case of ``args["cases"]`` in turn (collective loads)."""
    return [_one_case(case) for case in args["cases"]]


def head_over_ranks(args: dict) -> dict:
    """Every rank: a causal-LM save loaded into a sequence-classification model spread over the
    ranks (device_map="auto"); reports which parameters this rank holds and its loading info."""
    from transformers import AutoModelForSequenceClassification
    from weightcast.workers.api import load_pretrained
    model, info = load_pretrained(args["source"], model=AutoModelForSequenceClassification, num_labels=2,
                                  strict=False, device_map="auto", max_memory=args["max_memory"],
                                  output_loading_info=True, progress=False, timeout=120)
    held = [n for n, p in model.named_parameters() if not p.is_meta]
    score = model.score.weight
    return {"held": held, "info": {k: sorted(map(str, v)) for k, v in info.items()},
            "score": None if score.is_meta else _stats(score)}
