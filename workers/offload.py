"""``"disk"`` placements offloaded for real, as ``from_pretrained`` offloads them.

A module the device map puts on a rank's disk (``Place(rank, "disk")``: what does not fit the
ranks' ``max_memory`` budgets) is not held in memory: its parameters stay on meta and accelerate's
``AlignDevicesHook`` (``attach_align_device_hook`` with an ``OffloadedWeightsLoader``) reads them
from the checkpoint's own safetensors file at each forward and drops them after, as
``from_pretrained``'s ``accelerate_disk_offload`` + ``dispatch_model`` do for tensors that need no
conversion. Tensors a conversion merges (fused MoE experts) cannot be read back from one file
entry: such a placement is refused. Not collective: the owning rank offloads its own part.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from weightcast.orchestrator.errors import DeviceMapError


def split_offloaded(tensors: dict[str, torch.Tensor], disk: dict[str, list],
                    rank: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """This rank's tensors without the ones it offloads (dropped: not held), and those names."""
    mine = [n for n, (_, r) in disk.items() if r == rank]
    return {k: v for k, v in tensors.items() if k not in set(mine)}, mine


def offload_targets(module: torch.nn.Module, names: list[str], key_mapping: dict | None) -> dict[str, str]:
    """``{parameter name: checkpoint tensor}`` of the offloaded tensors, through the same key
    mapping the load uses (a renamed or prefixed key is fine; a converted one is refused)."""
    from weightcast.workers.convert import is_transformers_model, map_checkpoint_keys
    if not names:
        return {}
    if not is_transformers_model(module):
        return {n: n for n in names}
    out = {}
    for key, (target, pattern) in map_checkpoint_keys(module, names, key_mapping).items():
        if pattern is not None:
            raise DeviceMapError("A tensor that transformers converts while loading cannot be offloaded to disk",
                                 where=f"tensor {key!r} -> parameter {target!r}",
                                 expected="disk placements of tensors loaded as they are stored",
                                 fix="give the ranks more max_memory (or more ranks) so nothing lands on disk")
        out[target] = key
    return out


def attach_offload(module: torch.nn.Module, targets: dict[str, str], root: str, files: dict[str, str],
                   dtype_of: Callable[[str], torch.dtype | None], device: torch.device) -> None:
    """Hooks that read each offloaded parameter from its checkpoint file at forward time (on
    ``device``), as accelerate's ``dispatch_model`` does for ``"disk"`` modules."""
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import OffloadedWeightsLoader
    if not targets:
        return
    index = {}
    for target, key in targets.items():
        want = dtype_of(target) or module.get_parameter(target).dtype
        index[target] = {"safetensors_file": os.path.join(root, files[key]), "weight_name": key,
                         "dtype": str(want).removeprefix("torch.")}
    loader = OffloadedWeightsLoader(index=index)
    for owner in sorted({t.rpartition(".")[0] for t in targets}):
        sub = module.get_submodule(owner) if owner else module
        attach_align_device_hook(sub, execution_device=device, offload=True, weights_map=loader, module_name=owner)
