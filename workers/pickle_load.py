"""Pickle checkpoints (``pytorch_model*.bin``, ``*.pt``), only with ``allow_pickle=True``.

Loaded with ``torch.load(weights_only=True, mmap=True)`` (no code runs, pages are read on use).
Pickle files have no byte-range index, so there is no plan: every rank maps the files itself and
keeps every tensor (``replicate`` only). Not collective.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from weightcast.orchestrator.errors import CheckpointFormatError, ConfigError, PickleRefusedError
from weightcast.orchestrator.request import LoadRequest
from weightcast.orchestrator.order import LoadOrder


def _load_one(path: str) -> dict:
    """``torch.load(weights_only=True)``: no code in the file ever runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:  # legacy (non-zip) format cannot be mapped
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def load_pickle(order: LoadOrder, request: LoadRequest, group: Any) -> dict[str, torch.Tensor]:
    """Every rank, pickle checkpoints: load every file (not collective)."""
    if not request.allow_pickle:
        raise PickleRefusedError("Pickle weights are refused", where=order.root,
                                 fix="convert the checkpoint to safetensors, or pass allow_pickle=True")
    if request.device_map not in ("replicate", None):
        raise ConfigError("Pickle checkpoints load only with device_map='replicate'",
                          where=order.root, got=repr(request.device_map),
                          fix="convert the checkpoint to safetensors (weightcast save) for other device maps")
    out: dict[str, torch.Tensor] = {}
    for name in order.files:
        path = os.path.join(order.root, name)
        try:
            state = _load_one(path)
        except Exception as exc:  # noqa: BLE001 - any refusal of the safe unpickler
            raise CheckpointFormatError("A pickle weights file cannot be loaded safely", where=path,
                                        got=f"{type(exc).__name__}: {str(exc)[:300]}",
                                        fix="convert the checkpoint to safetensors from a trusted environment"
                                        ) from exc
        out.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out
