"""weightcast: load large safetensors checkpoints onto many processes, GPUs and nodes at once.

``import weightcast as wc; model = wc.load_pretrained("org/repo", device_map="tp")`` on every rank.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing weightcast must not import torch
    from workers import api
    if hasattr(api, name):
        return getattr(api, name)
    raise AttributeError(name)
