"""Putting a loaded training state into the live objects (every rank, not collective): weights into
the model's parameters (whole or FSDP2 local rows), the optimizer state (whole tensors for DDP,
``Shard(0)`` DTensors on the parameter's mesh for FSDP2), scheduler and scaler states.

:func:`apply_all` first builds and checks everything, then changes the objects, so a mismatch
leaves them untouched.
"""
from __future__ import annotations

import base64
import io
from typing import Any

import torch

from weightcast.orchestrator.errors import ModelMismatchError
from weightcast.orchestrator.training_plan import MARKER, ParamLayout

_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _is_sharded(p: Any) -> bool:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as TShard
    return isinstance(p, DTensor) and isinstance(p.placements[-1], TShard) and p.placements[-1].dim == 0


def is_fsdp(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP2 ``Shard(0)`` DTensors."""
    return any(_is_sharded(p) for p in model.parameters())


def _groups(p: Any) -> tuple[tuple[int, ...], ...]:
    mesh = p.device_mesh.mesh
    rows = mesh.reshape(-1, mesh.shape[-1]) if mesh.dim() > 1 else mesh.reshape(1, -1)
    return tuple(tuple(int(r) for r in row) for row in rows.tolist())


def optimizer_layouts(optimizer: Any) -> list[ParamLayout]:
    """Each parameter of the optimizer, flat over its param groups (the order of its state dict)."""
    out = []
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        groups = _groups(p) if _is_sharded(p) else None
        out.append(ParamLayout(i, tuple(p.shape), groups))
    return out


def _clean(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
        name = name.replace("._fsdp_wrapped_module.", ".").replace("._orig_mod.", ".")
    return name


def weight_pairs(model: torch.nn.Module, loaded: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, loaded) for every tensor of the model's state dict found in ``loaded``; a tied
    parameter absent from the checkpoint is covered by its partner. Raises ModelMismatchError for
    a parameter the checkpoint lacks or a shape that differs (FSDP2: the rank's local rows)."""
    pairs, seen, candidates = [], set(), []
    for name, dest in model.state_dict(keep_vars=True).items():
        key = _clean(name)
        src = loaded.get(key)
        if id(dest) in seen or src is None:
            candidates.append((key, dest))
            continue
        local = dest.to_local() if hasattr(dest, "to_local") else dest
        if tuple(local.shape) != tuple(src.shape):
            raise ModelMismatchError("A checkpoint tensor does not fit the model", where=f"tensor {key}",
                                     expected=f"shape {tuple(local.shape)} (this rank's part)",
                                     got=f"shape {tuple(src.shape)}",
                                     fix="resume with the model (and FSDP mesh) that wrote the checkpoint")
        seen.add(id(dest))
        pairs.append((local, src))
    absent = [k for k, d in candidates if isinstance(d, torch.nn.Parameter) and id(d) not in seen]
    if absent:
        raise ModelMismatchError("The checkpoint lacks weights of the model", where=f"{len(absent)} missing",
                                 got=str(absent[:10]), fix="pass the model the checkpoint belongs to, or weights=False")
    return pairs


def optimizer_state(optimizer: Any, meta: dict, tensors: dict) -> dict:
    """The state dict ``optimizer.load_state_dict`` takes: the saved object with each marker
    replaced by its tensor; the rows of a sharded parameter's state as a DTensor like the
    parameter (mesh, placements, full shape)."""
    from torch._weights_only_unpickler import Unpickler
    skeleton = Unpickler(io.BytesIO(base64.b64decode(meta["skeleton"])), encoding="utf-8").load()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    empty = {n: torch.empty(shape, dtype=getattr(torch, dtype)) for n, (dtype, shape) in meta["empty"].items()}

    def fill(obj: Any) -> Any:
        if isinstance(obj, str) and obj.startswith(MARKER):
            name = obj[len(MARKER):]
            return _state_tensor(name, tensors[name] if name in tensors else empty[name], params)
        if isinstance(obj, dict):
            return type(obj)((k, fill(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return type(obj)(fill(v) for v in obj)
        return obj
    return fill(skeleton)


def _state_tensor(name: str, t: torch.Tensor, params: list) -> torch.Tensor:
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
        return t
    p = params[int(parts[1])]
    if not _is_sharded(p) or not t.dim():
        return t
    from torch.distributed.tensor import DTensor
    from weightcast.workers.fsdp import local_rows
    local = local_rows(name, t, p, tuple(t.shape) != tuple(p.shape))
    return DTensor.from_local(local.to(p.device), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def apply_all(model: Any, loaded: dict | None, optimizer: Any, state: dict | None, meta: dict | None,
              scheduler: Any, scaler: Any, small: dict) -> None:
    """Build and check everything, then change the objects (every rank)."""
    pairs = weight_pairs(model, loaded) if model is not None and loaded is not None else []
    opt_sd = optimizer_state(optimizer, meta, state) if optimizer is not None and meta is not None else None
    with torch.no_grad():
        for dest, src in pairs:
            dest.copy_(src)
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    if scheduler is not None:
        scheduler.load_state_dict(small["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(small["scaler"])
