"""Tensor-parallel materialization: a meta skeleton parallelized with torch's tensor-parallel API,
filled with the loaded local shards as DTensors.

Called by :func:`weightcast.workers.execute._materialize` on every rank when the device map's strategy is
``tp`` and a model is requested (collective: building the device mesh creates process groups).

Steps: build the skeleton on meta; read each module's style from the device map's placements
(a Linear whose weight is split along dim 0 is ``ColwiseParallel``, along dim 1
``RowwiseParallel``; an Embedding split along the vocabulary is ``RowwiseParallel`` with a
replicated input; the output embeddings gather their output, so the logits are whole); apply
``parallelize_module`` over a ``DeviceMesh`` of the tp groups (one mesh dimension, or
``(replica, tp)`` when the map has several groups); then assign every loaded tensor, the shards as
``DTensor.from_local(shard, mesh, [Shard(dim)], shape=..., stride=...)`` (uneven ``torch.chunk``
splits included), and re-tie tied weights. No parameter is allocated twice or initialised.
"""
from __future__ import annotations

from typing import Any

import torch

from weightcast.orchestrator.device_map import ClusterDeviceMap, Shard, shard_bounds
from weightcast.orchestrator.errors import ModelMismatchError
from weightcast.orchestrator.request import LoadRequest
from weightcast.orchestrator.order import LoadOrder
from weightcast.workers.materialize import build_skeleton, check_keys


def materialize_tp(request: LoadRequest, order: LoadOrder, tensors: dict[str, torch.Tensor], device: torch.device,
                   group: Any) -> torch.nn.Module:
    """This rank's tensor-parallel model (collective over every rank of the load)."""
    dm = order.device_map
    module = build_skeleton(request.model, order.config, request.trust_remote_code, root=order.root,
                            source=request.source, overrides=request.model_kwargs)
    tied = _tied_partners(module, dm)
    styles = module_styles(module, dm, tied)
    groups = _shard_groups(dm)
    if not styles or not groups or len(groups[0]) == 1:
        from weightcast.workers.materialize import assign
        return assign(module, tensors, strict=request.strict, device=device)
    mesh = tp_mesh(groups, device, group.rank)
    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(module, mesh, styles)
    state = _dtensor_state(module, dm, tensors, mesh, device)
    module.load_state_dict(state, strict=False, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    _check_complete(module, state, request.strict)
    if device.type != "cpu":
        module.to(device)
    module.device_mesh = mesh
    return module


def tp_mesh(groups: tuple[tuple[int, ...], ...], device: torch.device, rank: int) -> Any:
    """The ``DeviceMesh`` of this rank's tp group: 1-d when one group holds every rank, else the
    ``tp`` dimension of a ``(replica, tp)`` mesh (collective: every rank builds the same mesh)."""
    from torch.distributed.device_mesh import DeviceMesh
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if len(groups) == 1:
        return DeviceMesh(device.type, torch.tensor(groups[0]), mesh_dim_names=("tp",))
    mesh = DeviceMesh(device.type, torch.tensor(groups), mesh_dim_names=("replica", "tp"))
    return mesh["tp"]


def _shard_groups(dm: ClusterDeviceMap) -> tuple[tuple[int, ...], ...]:
    for p in dm.placements.values():
        if isinstance(p, Shard):
            return p.groups
    return ()


def _tied_partners(module: torch.nn.Module, dm: ClusterDeviceMap) -> dict[str, str]:
    """Parameter name -> a tied partner present in the device map (for names the checkpoint
    lacks, such as ``lm_head.weight`` tied to the embeddings)."""
    out: dict[str, str] = {}
    for tied_group in dm.tied:
        present = [n for n in tied_group if n in dm.placements]
        for name in tied_group:
            if name not in dm.placements and present:
                out[name] = present[0]
    return out


def module_styles(module: torch.nn.Module, dm: ClusterDeviceMap, tied: dict[str, str]) -> dict[str, Any]:
    """``{module name: ParallelStyle}`` for every Linear / Embedding whose weight the map shards."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    output = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    styles: dict[str, Any] = {}
    for name, sub in module.named_modules():
        weight = f"{name}.weight" if name else "weight"
        p = dm.placements.get(tied.get(weight, weight))
        if not isinstance(p, Shard):
            continue
        if isinstance(sub, torch.nn.Embedding):
            styles[name] = (RowwiseParallel(input_layouts=Replicate()) if p.dim == 0
                            else ColwiseParallel(output_layouts=Replicate()))
        elif isinstance(sub, torch.nn.Linear) and p.dim in (0, 1):
            styles[name] = _linear_style(sub, p, sub is output)
        else:
            raise ModelMismatchError(
                "The device map shards a tensor of a module tensor parallelism cannot split",
                where=f"tensor {weight!r} ({type(sub).__name__}, dim {p.dim})",
                expected="Linear weights split along dim 0 or 1, Embedding weights along dim 0 or 1",
                fix="mark it 'replicate' in the tp plan")
    return styles


def _linear_style(linear: torch.nn.Linear, p: Shard, is_output: bool) -> Any:
    """Colwise for a dim-0 split, rowwise for dim 1. A colwise output split unevenly stays a
    DTensor (a local tensor would lose its true width, which the next rowwise layer needs)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    if p.dim == 1:
        return RowwiseParallel()
    if is_output:
        return ColwiseParallel(output_layouts=Replicate())
    return ColwiseParallel(use_local_output=linear.out_features % len(p.groups[0]) == 0)


def _dtensor_state(module: torch.nn.Module, dm: ClusterDeviceMap, tensors: dict[str, torch.Tensor],
                   mesh: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The loaded tensors, as DTensors where the parallelized skeleton holds a DTensor."""
    from torch.distributed.tensor import DTensor
    expected = module.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        want = expected.get(name)
        if want is None:
            state[name] = t  # unexpected key: load_state_dict reports it
            continue
        is_shard = isinstance(dm.placements.get(name), Shard)
        if isinstance(want, DTensor):
            local = _local_part(name, t, want, is_shard)
            state[name] = DTensor.from_local(local.to(device), mesh, want.placements, run_check=False,
                                             shape=want.shape, stride=want.stride())
        elif is_shard:
            raise ModelMismatchError("The device map shards a tensor the tensor-parallel model keeps whole",
                                     where=f"tensor {name!r}", got=f"local shard of shape {tuple(t.shape)}",
                                     expected=f"the whole tensor, shape {tuple(want.shape)}",
                                     fix="mark its module 'replicate' in the tp plan")
        else:
            _check_shape(name, t, tuple(want.shape), "the model's parameter")
            state[name] = t
    return state


def _local_part(name: str, t: torch.Tensor, want: Any, is_shard: bool) -> torch.Tensor:
    """This rank's local tensor of ``want``'s DTensor layout, from a loaded shard or whole tensor."""
    from torch.distributed.tensor import Shard as TShard
    local_shape = list(want.shape)
    narrow = None
    for mesh_dim, placement in enumerate(want.placements):
        if isinstance(placement, TShard):
            dim = placement.dim % len(local_shape)
            size = want.device_mesh.size(mesh_dim)
            start, stop = shard_bounds(want.shape[dim], size, want.device_mesh.get_local_rank(mesh_dim))
            local_shape[dim] = stop - start
            narrow = (dim, start, stop - start)
    if not is_shard and narrow is not None and tuple(t.shape) == tuple(want.shape):
        t = t.narrow(*narrow)  # replicated by the map, split by the model: keep this rank's rows
    _check_shape(name, t, tuple(local_shape), "this rank's tensor-parallel shard")
    return t


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise ModelMismatchError("A checkpoint tensor does not fit the model", where=f"tensor {name}",
                                 expected=f"{what}: shape {shape}", got=f"shape {tuple(t.shape)}",
                                 fix="check that the checkpoint, config.json and tp plan belong together")


def _check_complete(module: torch.nn.Module, state: dict, strict: bool) -> None:
    expected = module.state_dict(keep_vars=True)
    check_keys(module, [k for k in state if k not in expected], strict)