"""One load, step by step: rank 0 plans (:func:`plan_on_rank0`), every rank executes
(:func:`execute_plan`): read + move (per transport), then materialize, each phase ending in a
status exchange so a failure anywhere becomes the same error everywhere.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch

from weightcast.orchestrator.planner import owned_of
from weightcast.orchestrator.prepare import cluster_spec_arg
from weightcast.orchestrator.request import LoadRequest
from weightcast.workers import liveness
from weightcast.workers.coordinator import sync_status
from weightcast.workers.group import Group
from weightcast.workers.process_group import abort_phase
from weightcast.workers.materialize import cast_tensors, resolve_dtype
from weightcast.orchestrator.order import LoadOrder
from weightcast.workers.model_load import materialize_model, model_dtype
from weightcast.workers.report import PhaseClock
from weightcast.workers.testing import at_phase, make_reader
from weightcast.workers.transfer import TransferStats


def resolve_node_local(group: Group, request: LoadRequest) -> dict | None:
    """Node-local storage only (collective): local rank 0 of each node resolves (and for a hub
    repo downloads) the node's own copy while the node's other ranks wait, then every rank
    resolves it offline. Returns this rank's facts: root, file stamps and commit, or an error
    message rank 0 turns into the load's error. None for shared storage."""
    try:
        spec = cluster_spec_arg(request.cluster)
        node_local = spec is not None and spec.storage == "node-local"
    except Exception:  # noqa: BLE001 - a bad cluster argument is reported by rank 0's planning
        node_local = False
    if not node_local:
        return None
    from weightcast.workers.collectives import barrier
    out: dict = {}
    if group.local_rank == 0:
        out = _resolve_here(request, group.node, offline=request.local_files_only)
    barrier(group)
    if group.local_rank != 0:
        out = _resolve_here(request, group.node, offline=True)
    return out


def _resolve_here(request: LoadRequest, node: str, offline: bool | None) -> dict:
    from weightcast.orchestrator.source import resolve_source
    try:
        src = resolve_source(request.node_source(node), revision=request.revision, cache_dir=request.cache_dir,
                             local_files_only=offline, token=request.token, allow_pickle=request.allow_pickle)
        stamps = {}
        for name in src.weight_files:
            st = os.stat(os.path.join(src.root, name))
            stamps[name] = [st.st_size, st.st_mtime_ns]
        return {"root": src.root, "commit": src.revision, "stamps": stamps}
    except Exception as exc:  # noqa: BLE001 - shipped to rank 0, raised there for every rank
        return {"error": f"{type(exc).__name__}: {exc}", "node": node}


def plan_on_rank0(request: LoadRequest, facts: list[dict], load_id: str) -> bytes:
    """Rank 0 only: the prepare step (:func:`weightcast.orchestrator.prepare.prepare_load`) with
    this layer's model hooks; returns the encoded :class:`LoadOrder` every rank receives."""
    from weightcast.orchestrator.plan_codec import encode_order
    from weightcast.orchestrator.prepare import prepare_load
    from weightcast.workers.prepare_hooks import WorkerHooks
    return encode_order(prepare_load(request, facts, WorkerHooks(), load_id))


def _phase(group: Group, request: LoadRequest, clock: PhaseClock, name: str, fn: Callable[[], Any],
           cleanup: Callable[[], None] | None = None) -> Any:
    """Run one phase on this rank, then exchange status: every rank raises if any failed."""
    clock.start(name)
    result, error = None, None
    try:
        at_phase(name, group.rank)
        result = fn()
    except BaseException as exc:  # noqa: BLE001 - reported to every rank by sync_status
        if isinstance(exc, KeyboardInterrupt) and group.world_size == 1:
            raise
        error = exc
    clock.stop(name)
    if error is not None and group.world_size > 1:
        abort_phase(group, error)  # peers waiting on this rank inside the phase fail now
    try:
        sync_status(group, name, error)
    except BaseException:
        if cleanup is not None:
            cleanup()
        raise
    return result


def execute_plan(group: Group, request: LoadRequest, order: LoadOrder, device: torch.device, clock: PhaseClock):
    """Every rank: read and move per the plan, then materialize (collective)."""
    guards: list = []  # the file guard of a node-shared move (its leases held until the end), for materialize
    try:
        if order.kind == "pickle":
            from weightcast.workers.pickle_load import load_pickle
            tensors = _phase(group, request, clock, "read", lambda: load_pickle(order, request, group))
            stats, plan = TransferStats(read_bytes=0), None
        else:
            plan = order.plan
            tensors, stats = _phase(group, request, clock, "transfer",
                                    lambda: _verified(_move(group, request, order, plan, device, guards), order,
                                                      plan, group.rank),
                                    cleanup=lambda: _remove_areas(order))
        stats.owned_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        stats.unleased = {n: why for g in guards for n, why in g.leases.unleased.items()}
        owned = owned_of(plan, group.rank) if plan is not None else ()
        result = _phase(group, request, clock, "materialize",
                        lambda: _materialize(group, request, order, tensors, device, owned, plan, tuple(guards)))
    finally:
        for guard in guards:  # a writer waiting on a checkpoint file goes on
            guard.release()
    return result, stats, plan


def _verified(moved: tuple, order: LoadOrder, plan, rank: int) -> tuple:
    """``verify_checksums``: check every whole tensor this rank owns against the plan's crc32."""
    from weightcast.workers.reader import check_crc32
    crcs = order.crc32
    if crcs:
        whole = {o.name for o in owned_of(plan, rank) if o.dim is None}
        for name, tensor in moved[0].items():
            if name in whole and name in crcs:
                check_crc32(name, crcs[name][0], tensor, crcs[name][1])
    return moved


def _remove_areas(order: LoadOrder) -> None:
    from weightcast.workers.staging_areas import remove_areas
    remove_areas(order.load_id)


def _move(group: Group, request: LoadRequest, order: LoadOrder, plan, device: torch.device, guards: list):
    root = order.root
    files = plan.files
    if order.local_stamps is not None:  # node-local copy: this node's own sizes and mtimes
        from weightcast.orchestrator.planner import FileStamp
        files = tuple(FileStamp(f.name, *order.local_stamps.get(f.name, (f.size, f.mtime_ns)))
                      for f in plan.files)
        plan = dataclasses.replace(plan, files=files)
    reader = make_reader(root, files, lambda: _storage_reader(request, root, files))
    if liveness.of(group) is not None:  # reads stop at the first lost peer
        reader = liveness.GuardedReader(reader, liveness.of(group))
    try:
        if order.transport == "node-shared":
            from weightcast.workers.staging import run_node_shared
            from weightcast.workers.staging_areas import reclaim_stale
            if group.local_rank == 0:
                reclaim_stale()
            nodes = dict((r, n) for n, ranks in plan.nodes for r in ranks)
            guard = _file_guard(root, files, order, nodes.get(group.rank) == nodes.get(0))
            if guard is not None:
                guards.append(guard)
            moved = run_node_shared(group, plan, root, reader, order.load_id, request.threads, request.progress,
                                    before_views=guard.check if guard else None,
                                    on_map=guard.note_mapping if guard else None)
            if guard is not None and (request.verify_checksums or not request.zero_copy):  # they touch pages now
                guard.check(moved[0])
            if not request.zero_copy:  # private copies: nothing stays a view of a file
                moved = ({name: t.clone() for name, t in moved[0].items()}, *moved[1:])
            return moved
        from weightcast.workers.transfer import run_collective
        return run_collective(group, plan, reader, device, request.threads)
    finally:
        reader.close()


def _file_guard(root: str, files: tuple, order: LoadOrder, planner_node: bool = True) -> Any:
    """The node-shared transport maps local files: their identities, checked before every step
    that touches the mapped pages (see workers.file_guard), and again before materialize.
    Inodes are compared with rank 0's only on rank 0's node (``planner_node``): other nodes'
    mounts of shared storage may number the same file differently."""
    if root.startswith("s3://"):
        return None
    from weightcast.workers.file_guard import FileGuard
    same_mount = order.local_stamps is None and planner_node  # node-local: other copies
    planned = order.file_ids if same_mount else None
    guard = FileGuard(root, files, planned)
    guard.snapshot()
    return guard


def _storage_reader(request: LoadRequest, root: str, files: tuple) -> Any:
    """This rank's real reader: ranged GETs for an object store, else the file reader."""
    if root.startswith("s3://"):
        from weightcast.workers.s3 import reader_for
        return reader_for(root, files, request.storage_options, request.timeout)
    from weightcast.workers.reader import FileReader
    return FileReader(root, files)


class OwnedTensors(dict):
    """What this rank owns, ``name -> tensor``; ``slices[name]`` is ``(dim, start, stop)`` for a
    shard (rows ``[start, stop)`` of the full tensor along ``dim``) or None for a whole tensor."""

    def __init__(self, tensors: dict, owned: tuple = ()) -> None:
        super().__init__(tensors)
        self.slices = {o.name: (None if o.dim is None else (o.dim, o.start, o.stop)) for o in owned}
        self.full_shapes = {o.name: tuple(o.shape) for o in owned}


def _materialize(group: Group, request: LoadRequest, order: LoadOrder, tensors: dict, device: torch.device,
                 plan_owned: tuple = (), plan=None, guards: tuple = ()):
    for guard in guards:  # node-shared views: their files must be unchanged before any touch
        guard.check(tensors)
    at_phase("materialize-checked", group.rank)
    result = _materialize_tensors(group, request, order, tensors, device, plan_owned, plan)
    for guard in guards:  # and no writer waited on them meanwhile: the result is what the files held
        guard.finish()
    return result


def _materialize_tensors(group: Group, request: LoadRequest, order: LoadOrder, tensors: dict,
                         device: torch.device, plan_owned: tuple = (), plan=None):
    if request.model is None:  # dtype="auto": the tensors as stored, as safetensors' load_file returns them
        dtype = None if request.dtype == "auto" else resolve_dtype(request.dtype, order.config)
        return OwnedTensors(cast_tensors(tensors, dtype), plan_owned)
    if order.kind == "pickle":
        return materialize_model(request, order, tensors, device)
    from weightcast.orchestrator.device_map import hf_device_map
    dm = order.device_map
    if dm.strategy == "tp" and order.model_tp_size is not None:
        from weightcast.workers.tp_hf import materialize_hf_tp
        return materialize_hf_tp(request, order, tensors, plan, plan_owned, group)
    if dm.strategy == "tp":
        from weightcast.workers.tp import materialize_tp
        return materialize_tp(request, order, cast_tensors(tensors, model_dtype(request.dtype, order)), device, group)
    if dm.strategy == "fsdp":
        from weightcast.workers.fsdp import materialize_fsdp
        return materialize_fsdp(request, order, cast_tensors(tensors, model_dtype(request.dtype, order)), device, group)
    if dm.strategy == "replicate":
        return materialize_model(request, order, tensors, device)
    from weightcast.orchestrator.key_mapping import renamed_map
    from weightcast.workers.model_load import owns_of
    dm = renamed_map(dm, order.targets or {})
    module = materialize_model(request, order, tensors, device, owns=owns_of(dm, group.rank), rank=group.rank)
    module.hf_device_map = hf_device_map(dm, group.rank)
    return module
