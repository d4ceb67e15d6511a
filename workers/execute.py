"""One load, step by step: rank 0 plans (:func:`plan_on_rank0`), every rank executes
(:func:`execute_plan`): read + move (per transport), then materialize, each phase ending in a
status exchange so a failure anywhere becomes the same error everywhere.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch

from weightcast.orchestrator.errors import ConfigError
from weightcast.orchestrator.planner import owned_of
from weightcast.orchestrator.request import LoadRequest
from weightcast.workers import liveness
from weightcast.workers.coordinator import sync_status
from weightcast.workers.group import Group
from weightcast.workers.process_group import abort_phase
from weightcast.workers.materialize import cast_tensors, resolve_dtype
from weightcast.orchestrator.safetensors_format import check_loadable_dtypes
from weightcast.workers.model_load import first_float_dtype, init_seed, materialize_model, model_dtype
from weightcast.workers.offload import disk_placements
from weightcast.workers.report import PhaseClock
from weightcast.workers.testing import at_phase, make_reader
from weightcast.workers.transfer import TransferStats


def _cluster(request: LoadRequest, facts: list[dict]):
    from weightcast.orchestrator.cluster import ClusterSpec, cluster_from_facts, load_cluster
    facts = [{k: v for k, v in f.items() if k != "local_source"} for f in facts]
    if request.cluster is None:
        return cluster_from_facts(facts)
    spec = request.cluster if isinstance(request.cluster, ClusterSpec) else load_cluster(os.fspath(request.cluster))
    if spec.world_size != len(facts):
        raise ConfigError("The cluster spec does not match the job", where="cluster argument",
                          expected=f"{len(facts)} ranks (the job's world size)", got=f"{spec.world_size} ranks",
                          fix="pass a cluster spec with as many ranks as the job, or cluster=None to detect it")
    # the ranks' real topology (hosts, local ranks, devices), the spec's storage and bandwidths
    return cluster_from_facts(facts, template=spec)


def _storage_of(request: LoadRequest) -> str:
    if request.cluster is None:
        return "shared"
    from weightcast.orchestrator.cluster import ClusterSpec, load_cluster
    spec = request.cluster if isinstance(request.cluster, ClusterSpec) else load_cluster(os.fspath(request.cluster))
    return spec.storage


def resolve_node_local(group: Group, request: LoadRequest) -> dict | None:
    """Node-local storage only (collective): local rank 0 of each node resolves (and for a hub
    repo downloads) the node's own copy while the node's other ranks wait, then every rank
    resolves it offline. Returns this rank's facts: root, file stamps and commit, or an error
    message rank 0 turns into the load's error. None for shared storage."""
    try:
        node_local = _storage_of(request) == "node-local"
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


def _check_node_copies(facts: list[dict]) -> None:
    """Rank 0, node-local storage: every node must hold the same files (same commit, sizes)."""
    from weightcast.orchestrator.cache_doctor import compare_snapshots
    from weightcast.orchestrator.errors import StorageError
    per_node: dict[str, dict] = {}
    for f in facts:
        local = f.get("local_source")
        if local is None:
            continue
        if "error" in local:
            raise StorageError("A node cannot resolve its copy of the checkpoint", where=f"node {f['host']}",
                               got=local["error"], fix="put the same checkpoint on every node (node-local storage)")
        per_node.setdefault(f["host"], {"node": f["host"], "commit": local["commit"],
                                        "files": {k: v[0] for k, v in local["stamps"].items()}})
    compare_snapshots(list(per_node.values()))


def _transport(request: LoadRequest, facts: list[dict]) -> str:
    if request.transport != "auto":
        return request.transport
    return "collective" if any(f["device"].startswith("cuda") for f in facts) else "node-shared"


def plan_on_rank0(request: LoadRequest, facts: list[dict], load_id: str) -> dict:
    """Rank 0 only: resolve the source, parse the index, build the device map and the plan.
    Returns the JSON-able payload every rank receives."""
    from weightcast.orchestrator.checkpoint import load_index
    from weightcast.orchestrator.device_map import build_device_map, device_map_to_json
    from weightcast.orchestrator.planner import PlanOptions, plan_load, plan_to_json
    from weightcast.orchestrator.source import resolve_source
    from weightcast.orchestrator.object_source import is_object_url
    if any("local_source" in f for f in facts):
        _check_node_copies(facts)
    if is_object_url(request.source):
        from weightcast.orchestrator.object_source import load_object_index
        from weightcast.workers.s3 import open_checkpoint
        store, ckpt = open_checkpoint(request.source, request.storage_options, request.timeout)
        src = ckpt.source
    else:
        src = resolve_source(request.node_source(facts[0]["host"]), revision=request.revision, cache_dir=request.cache_dir,
                             local_files_only=request.local_files_only, token=request.token, allow_pickle=request.allow_pickle)
    if src.kind == "pickle":
        return {"kind": "pickle", "root": src.root, "files": list(src.weight_files), "config": src.config,
                "transport": "pickle", "checkpoint_bytes": 0, "load_id": load_id, "init_seed": init_seed()}
    _refuse_remote_code(request, src.config)
    if is_object_url(request.source):
        index = load_object_index(store, ckpt)
    else:
        _check_cache_files(src)
        index = load_index(_index_path(request, facts[0]["host"], src.root), cache_root=src.cache_root)
    check_loadable_dtypes(index.tensors)
    cluster = _cluster(request, facts)
    model_tp = _model_tp_rules(request, src, index, cluster)
    dm = build_device_map(index, cluster, request.device_map, max_memory=request.max_memory, tp_size=request.tp_size,
                          config=src.config, key_rules=model_tp[0] if model_tp else None)
    transport = _transport(request, facts)
    options = PlanOptions(transport=transport, chunk_bytes=request.chunk_bytes, bucket_bytes=request.bucket_bytes)
    plan = plan_load(index, cluster, dm, options)
    _check_fits(plan, cluster, index)
    payload = {"kind": "safetensors", "root": src.root, "config": src.config, "transport": transport,
               "plan": plan_to_json(plan).decode(), "device_map": device_map_to_json(dm),
               "checkpoint_bytes": index.total_bytes, "load_id": load_id, "init_seed": init_seed(),
               "auto_dtype": first_float_dtype(index), "disk": disk_placements(dm, index)}
    if model_tp:
        payload["model_tp_size"] = model_tp[1]
    elif dm.strategy not in ("replicate", "tp", "fsdp"):  # spread over ranks: who holds which parameter
        from weightcast.workers.convert import model_targets
        payload["targets"] = model_targets(request, src, list(index.names))
    if request.verify_checksums:
        payload["crc32"] = checksums_of(index)
    return payload


def _model_tp_rules(request: LoadRequest, src, index, cluster) -> tuple | None:
    """Rank 0, ``device_map="tp"``: (key rules, tp size) from a transformers model's own plan."""
    if not (isinstance(request.device_map, str) and request.device_map == "tp"):
        return None
    from weightcast.workers.tp_hf import plan_rules
    return plan_rules(request, src, {t.name: tuple(t.shape) for t in index.tensors}, cluster)


def _refuse_remote_code(request: LoadRequest, config: dict | None) -> None:
    """Rank 0, before reading any weight: a transformers model whose config.json asks for remote
    code (``auto_map``) that transformers has no class for needs ``trust_remote_code=True``
    (a native model type carrying an ``auto_map`` loads with the library's class, as in
    from_pretrained)."""
    if request.trust_remote_code or not config or not config.get("auto_map") or request.model is None:
        return
    from weightcast.workers.hf_model import is_hf_class, needs_remote_code
    if (request.model == "auto" or is_hf_class(request.model)) and needs_remote_code(config):
        from weightcast.orchestrator.errors import RemoteCodeRefusedError
        raise RemoteCodeRefusedError("config.json asks for remote code (auto_map)", where="config.json",
                                     got=f"auto_map={config['auto_map']!r}"[:300],
                                     fix="review that code and pass trust_remote_code=True, or pass model=<factory>")


def _index_path(request: LoadRequest, node: str, root: str) -> str:
    """What to index: the file the source names (an explicit ``model.safetensors`` beside an
    index loads that file, as from_pretrained does), else the checkpoint directory."""
    path = os.path.expanduser(request.node_source(node))
    return os.path.abspath(path) if os.path.isfile(path) and path.endswith(".safetensors") else root


def _check_fits(plan, cluster, index) -> None:
    """Rank 0: refuse a plan in which a rank owns more bytes than its device (host, for CPU)
    memory, before any byte is read (a small sparse file can declare a terabyte tensor)."""
    from weightcast.orchestrator.errors import DeviceMapError
    from weightcast.orchestrator.planner import rank_owned_bytes
    specs = {r.rank: r for r in cluster.ranks}
    for rank, owned in enumerate(rank_owned_bytes(plan, {t.name: t.length for t in index.tensors})):
        spec = specs[rank]
        if spec.device_memory and owned > spec.device_memory:
            big = max(index.tensors, key=lambda t: t.length)
            raise DeviceMapError(
                "A rank's part of the checkpoint does not fit its memory",
                where=f"rank {rank} ({spec.device}) on host {spec.node}",
                expected=f"at most {spec.device_memory:,} bytes", got=f"{owned:,} bytes; largest tensor "
                f"{big.name!r} in file {big.file!r}: {big.dtype}{list(big.shape)}, {big.length:,} bytes",
                fix="shard the model over more ranks (device_map='tp' or 'auto'), or check the checkpoint: "
                    "a header declaring huge tensors is suspect")


def checksums_of(index) -> dict[str, list]:
    """Rank 0, ``verify_checksums``: ``{tensor: [file, crc32]}`` from the files' ``__metadata__``
    entries ``weightcast.crc32.<tensor>`` (8 hex digits of zlib.crc32 of the tensor's bytes)."""
    from weightcast.orchestrator.errors import ConfigError
    from weightcast.workers.reader import CRC_PREFIX
    out = {}
    for f in index.files:
        for key, value in f.metadata.items():
            if key.startswith(CRC_PREFIX):
                out[key[len(CRC_PREFIX):]] = [f.name, value]
    if not out:
        raise ConfigError("verify_checksums needs checksums in the checkpoint", where=index.root,
                          expected=f"__metadata__ entries '{CRC_PREFIX}<tensor>' in the safetensors headers",
                          got="none", fix="write them with workers.reader.checksum_metadata(state_dict) as "
                          "the files' metadata, or load without verify_checksums")
    return out


def _check_cache_files(src) -> None:
    if not src.cache_root:
        return
    try:
        from weightcast.orchestrator.cache_doctor import check_snapshot_files
    except ImportError:
        return
    check_snapshot_files(src.root, list(src.weight_files))


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


def execute_plan(group: Group, request: LoadRequest, payload: dict, device: torch.device, clock: PhaseClock):
    """Every rank: read and move per the plan, then materialize (collective)."""
    if payload["kind"] == "pickle":
        from weightcast.workers.pickle_load import load_pickle
        tensors = _phase(group, request, clock, "read", lambda: load_pickle(payload, request, group))
        stats, plan = TransferStats(read_bytes=0), None
    else:
        from weightcast.orchestrator.planner import plan_from_json
        plan = plan_from_json(payload["plan"].encode())
        tensors, stats = _phase(group, request, clock, "transfer",
                                lambda: _verified(_move(group, request, payload, plan, device), payload, plan, group.rank),
                                cleanup=lambda: _remove_areas(payload))
    stats.owned_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    owned = owned_of(plan, group.rank) if plan is not None else ()
    result = _phase(group, request, clock, "materialize",
                    lambda: _materialize(group, request, payload, tensors, device, owned, plan))
    return result, stats, plan


def _verified(moved: tuple, payload: dict, plan, rank: int) -> tuple:
    """``verify_checksums``: check every whole tensor this rank owns against the plan's crc32."""
    from weightcast.workers.reader import check_crc32
    crcs = payload.get("crc32")
    if crcs:
        whole = {o.name for o in owned_of(plan, rank) if o.dim is None}
        for name, tensor in moved[0].items():
            if name in whole and name in crcs:
                check_crc32(name, crcs[name][0], tensor, crcs[name][1])
    return moved


def _remove_areas(payload: dict) -> None:
    from weightcast.workers.staging_areas import remove_areas
    remove_areas(payload["load_id"])


def _move(group: Group, request: LoadRequest, payload: dict, plan, device: torch.device):
    root = payload["root"]
    files = plan.files
    if "local_stamps" in payload:  # node-local copy: this node's own sizes and mtimes
        from weightcast.orchestrator.planner import FileStamp
        files = tuple(FileStamp(f.name, *payload["local_stamps"].get(f.name, (f.size, f.mtime_ns)))
                      for f in plan.files)
        plan = dataclasses.replace(plan, files=files)
    reader = make_reader(root, files, lambda: _storage_reader(request, root, files))
    if liveness.of(group) is not None:  # reads stop at the first lost peer
        reader = liveness.GuardedReader(reader, liveness.of(group))
    try:
        if payload["transport"] == "node-shared":
            from weightcast.workers.staging import run_node_shared
            from weightcast.workers.staging_areas import reclaim_stale
            if group.local_rank == 0:
                reclaim_stale()
            return run_node_shared(group, plan, root, reader, payload["load_id"], request.threads, request.progress)
        from weightcast.workers.transfer import run_collective
        return run_collective(group, plan, reader, device, request.threads)
    finally:
        reader.close()


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


def _materialize(group: Group, request: LoadRequest, payload: dict, tensors: dict, device: torch.device,
                 plan_owned: tuple = (), plan=None):
    if request.model is None:  # dtype="auto": the tensors as stored, as safetensors' load_file returns them
        dtype = None if request.dtype == "auto" else resolve_dtype(request.dtype, payload.get("config"))
        return OwnedTensors(cast_tensors(tensors, dtype), plan_owned)
    if payload["kind"] == "pickle":
        return materialize_model(request, payload, tensors, device)
    from weightcast.orchestrator.device_map import device_map_from_json, hf_device_map
    dm = device_map_from_json(payload["device_map"])
    if dm.strategy == "tp" and "model_tp_size" in payload:
        from weightcast.workers.tp_hf import materialize_hf_tp
        return materialize_hf_tp(request, payload, tensors, plan, plan_owned, group)
    if dm.strategy == "tp":
        from weightcast.workers.tp import materialize_tp
        return materialize_tp(request, payload, cast_tensors(tensors, model_dtype(request.dtype, payload)), device, group)
    if dm.strategy == "fsdp":
        from weightcast.workers.fsdp import materialize_fsdp
        return materialize_fsdp(request, payload, cast_tensors(tensors, model_dtype(request.dtype, payload)), device, group)
    if dm.strategy == "replicate":
        return materialize_model(request, payload, tensors, device)
    from weightcast.orchestrator.key_mapping import renamed_map
    from weightcast.workers.model_load import owns_of
    dm = renamed_map(dm, payload.get("targets") or {})
    module = materialize_model(request, payload, tensors, device, owns=owns_of(dm, group.rank), rank=group.rank)
    module.hf_device_map = hf_device_map(dm, group.rank)
    return module
