"""Planning a training-state load: the tensors of a ``torch.save`` file (``optimizer.pt``) as a
:class:`~weightcast.orchestrator.checkpoint.CheckpointIndex`, placed per the optimizer's layout, so
the ordinary planner reads every byte once per cluster and the ordinary transports move it.

Called on the coordinator (rank 0) only; pure (reads file metadata through
:mod:`weightcast.orchestrator.torch_zip`).

Each non-empty tensor of the file is one index entry named by its path in the object
(``state/3/exp_avg``). The device map replicates every entry (DDP: each rank holds the whole
state) except the state of a parameter the live optimizer holds as an FSDP2 ``Shard(0)`` DTensor:
a state tensor of the parameter's full shape is then ``Shard(0)`` over the parameter's shard groups,
so each rank reads and receives only the rows ``fully_shard`` gave it. The object itself (param
groups, scalars) travels as a weights-only pickle whose tensors are name markers.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from weightcast.orchestrator.checkpoint import CheckpointIndex, FileEntry, TensorEntry
from weightcast.orchestrator.device_map import ClusterDeviceMap, Placement, Replicate, Shard
from weightcast.orchestrator.device_map_fsdp import evenly_shardable
from weightcast.orchestrator.errors import CheckpointFormatError, ModelMismatchError
from weightcast.orchestrator.torch_zip import TensorRef, TorchSaveIndex

MARKER = "\x00weightcast-tensor:"
_TORCH_TO_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                  "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                  "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


@dataclass(frozen=True)
class ParamLayout:
    """What rank 0's optimizer holds for parameter ``index`` (flat over its param groups): the
    full shape, and the shard groups when it is a ``Shard(0)`` DTensor (None: whole)."""
    index: int
    shape: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...] | None = None


def entry_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def state_index(saved: TorchSaveIndex, file_name: str) -> tuple[CheckpointIndex, dict[str, TensorRef]]:
    """The non-empty tensors of ``saved`` as a CheckpointIndex over ``file_name`` (and every ref by
    name, empty tensors included). Two tensors sharing bytes are refused (the planner reads
    disjoint ranges)."""
    refs = {entry_name(p): r for p, r in saved.tensors()}
    entries = []
    for name, r in refs.items():
        if r.length:
            code = _TORCH_TO_CODE.get(r.dtype)
            if code is None:
                raise CheckpointFormatError("A saved state tensor has a dtype weightcast does not move",
                                            where=f"{file_name}: {name}", got=r.dtype,
                                            expected=f"one of {sorted(_TORCH_TO_CODE)}")
            entries.append(TensorEntry(name, file_name, code, r.shape, r.offset, r.length))
    entries.sort(key=lambda e: e.offset)
    for a, b in zip(entries, entries[1:]):
        if b.offset < a.end:
            raise CheckpointFormatError("Two saved tensors share storage bytes", where=f"file {file_name!r}",
                                        got=f"{a.name!r} and {b.name!r}",
                                        fix="save independent tensors (optimizer.state_dict() does)")
    root = os.path.dirname(saved.path)
    files = (FileEntry(file_name, saved.size, saved.mtime_ns, 0),)
    return CheckpointIndex(root, files, tuple(entries)), refs


def optimizer_map(index: CheckpointIndex, saved_obj: Any, layouts: Sequence[ParamLayout],
                  world_size: int, devices: Sequence[str], file_name: str) -> ClusterDeviceMap:
    """Placements of an optimizer state dict's tensors for the live optimizer's ``layouts``."""
    check_param_count(saved_obj, layouts, file_name)
    everyone = Replicate(tuple(range(world_size)))
    by_index = {lay.index: lay for lay in layouts}
    shards: dict[tuple, Shard] = {}
    placements: dict[str, Placement] = {}
    for name in index.names:
        shape = tuple(index.tensor(name).shape)
        lay = _layout_of(name, by_index)
        placements[name] = everyone
        if lay is None or not shape:
            continue
        if shape != lay.shape:
            raise ModelMismatchError("A saved optimizer state does not fit its parameter",
                                     where=f"{file_name}: {name}", expected=f"shape {list(lay.shape)}",
                                     got=f"shape {list(shape)}",
                                     fix="resume with the model and optimizer that wrote the checkpoint")
        if lay.groups is not None and evenly_shardable(shape, len(lay.groups[0])):
            placements[name] = shards.setdefault(lay.groups, Shard(0, lay.groups))
    return ClusterDeviceMap(placements, "explicit", devices=tuple(devices))


def _layout_of(name: str, by_index: Mapping[int, ParamLayout]) -> ParamLayout | None:
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "state" and parts[1].lstrip("-").isdigit():
        return by_index.get(int(parts[1]))
    return None


def check_param_count(saved_obj: Any, layouts: Sequence[ParamLayout], file_name: str) -> None:
    """The saved param groups must list as many parameters as the live optimizer holds."""
    groups = saved_obj.get("param_groups") if isinstance(saved_obj, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise CheckpointFormatError("Not an optimizer state dict", where=f"file {file_name!r}",
                                    expected="{'state': {...}, 'param_groups': [{'params': [...]}, ...]}")
    saved = sum(len(g["params"]) for g in groups)
    if saved != len(layouts):
        raise ModelMismatchError("The saved optimizer holds another number of parameters", where=f"file {file_name!r}",
                                 expected=f"{len(layouts)} parameters (the live optimizer)", got=f"{saved}",
                                 fix="build the optimizer with the same parameter groups as the run that saved it")


def skeleton_bytes(obj: Any) -> bytes:
    """``obj`` with every :class:`TensorRef` replaced by a name marker, pickled (protocol 2: read
    back with torch's weights-only unpickler)."""
    return pickle.dumps(_mark(obj, ()), protocol=2)


def _mark(obj: Any, path: tuple) -> Any:
    if isinstance(obj, TensorRef):
        return MARKER + entry_name(path)
    if isinstance(obj, dict):
        return type(obj)((k, _mark(v, (*path, k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_mark(v, (*path, i)) for i, v in enumerate(obj))
    return obj
