"""FSDP2 materialization: a meta skeleton wrapped with ``fully_shard`` as users wrap it (each
transformer block, then the root), filled with the loaded dim-0 slices as ``Shard(0)`` DTensors.

Called by :func:`weightcast.workers.execute._materialize` on every rank when the device map's
strategy is ``fsdp`` and a model is requested (collective: building the device mesh and
``fully_shard`` create process groups).

The slices are the ones ``fully_shard`` itself cuts (``torch.chunk`` rows, trailing ranks
possibly empty; :func:`weightcast.orchestrator.device_map_fsdp.fsdp_bounds`); they go in with
``load_state_dict(assign=True)``, after which FSDP2's own post-load hook pads them to its
sharded layout. The result is the module ``fully_shard`` would have produced from the full
state dict, ready for an optimizer and ``backward``; ``model.device_mesh`` is its mesh.
"""
from __future__ import annotations

from typing import Any

import torch

from weightcast.orchestrator.device_map import ClusterDeviceMap, Shard
from weightcast.orchestrator.device_map_fsdp import fsdp_bounds
from weightcast.orchestrator.errors import ModelMismatchError
from weightcast.orchestrator.order import LoadOrder
from weightcast.workers.materialize import build_skeleton, check_keys


def materialize_fsdp(request: Any, order: LoadOrder, tensors: dict[str, torch.Tensor], device: torch.device,
                     group: Any) -> torch.nn.Module:
    """This rank's FSDP2 model (collective over every rank of the load)."""
    dm = order.device_map
    module = build_skeleton(request.model, order.config, request.trust_remote_code)
    mesh = fsdp_mesh(shard_groups(dm), device)
    apply_fully_shard(module, mesh)
    state = _sharded_state(module, dm, tensors, device)
    result = module.load_state_dict(state, strict=False, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    check_keys(module, result.unexpected_keys, request.strict)
    module.device_mesh = mesh
    module.eval()  # as from_pretrained returns it; call model.train() to train
    return module


def shard_groups(dm: ClusterDeviceMap) -> tuple[tuple[int, ...], ...]:
    """The map's shard groups (one group of every rank when no tensor is sharded)."""
    for p in dm.placements.values():
        if isinstance(p, Shard):
            return p.groups
    return (tuple(range(dm.world_size or 1)),)


def fsdp_mesh(groups: tuple[tuple[int, ...], ...], device: torch.device) -> Any:
    """The ``DeviceMesh`` FSDP2 shards over: 1-d ``("shard",)`` for one group, else the HSDP mesh
    ``("replicate", "shard")`` whose rows are the groups (collective: every rank builds it)."""
    from torch.distributed.device_mesh import DeviceMesh
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if len(groups) == 1:
        return DeviceMesh(device.type, torch.tensor(groups[0]), mesh_dim_names=("shard",))
    return DeviceMesh(device.type, torch.tensor(groups), mesh_dim_names=("replicate", "shard"))


def block_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules wrapped one by one: those whose class is in transformers' ``_no_split_modules``
    (the decoder layers), else every child of an ``nn.ModuleList``."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if m is not module and type(m).__name__ in names]
    if blocks:
        return blocks
    return [child for m in module.modules() if isinstance(m, torch.nn.ModuleList) for child in m]


def apply_fully_shard(module: torch.nn.Module, mesh: Any, **kwargs: Any) -> torch.nn.Module:
    """``fully_shard`` each block, then the root, over ``mesh`` (collective); ``kwargs`` go to
    every ``fully_shard`` call (``mp_policy``, ``reshard_after_forward``, ...)."""
    from torch.distributed.fsdp import fully_shard
    for block in block_modules(module):
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(module, mesh=mesh, **kwargs)
    return module


def _sharded_state(module: torch.nn.Module, dm: ClusterDeviceMap, tensors: dict[str, torch.Tensor],
                   device: torch.device) -> dict[str, torch.Tensor]:
    """The loaded tensors as the DTensors the sharded skeleton holds (others unchanged)."""
    from torch.distributed.tensor import DTensor
    expected = module.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        want = expected.get(name)
        if not isinstance(want, DTensor):
            if want is not None and tuple(want.shape) != tuple(t.shape):
                _mismatch(name, tuple(want.shape), t)
            state[name] = t
            continue
        local = local_rows(name, t, want, isinstance(dm.placements.get(name), Shard))
        state[name] = DTensor.from_local(local.to(device), want.device_mesh, want.placements,
                                         run_check=False, shape=want.shape, stride=want.stride())
    return state


def local_rows(name: str, t: torch.Tensor, want: Any, is_slice: bool) -> torch.Tensor:
    """This rank's ``fully_shard`` rows of ``want`` (a Shard(0) DTensor), from a loaded slice
    (``is_slice``) or from the whole tensor."""
    mesh = want.device_mesh
    parts, index = mesh.size(mesh.ndim - 1), mesh.get_local_rank(mesh.ndim - 1)
    rows = want.shape[0] if want.dim() else 0
    start, stop = fsdp_bounds(rows, parts, index)
    if not is_slice and tuple(t.shape) == tuple(want.shape):
        t = t.narrow(0, start, stop - start)
    expected = (stop - start, *want.shape[1:])
    if tuple(t.shape) != expected:
        _mismatch(name, expected, t)
    return t


def _mismatch(name: str, shape: tuple[int, ...], t: torch.Tensor) -> None:
    raise ModelMismatchError("A checkpoint tensor does not fit the model", where=f"tensor {name}",
                             expected=f"shape {shape} (this rank's FSDP2 rows)", got=f"shape {tuple(t.shape)}",
                             fix="check that the checkpoint and config.json belong together")
