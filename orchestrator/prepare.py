"""The one prepare step of a load: source -> checks -> cluster -> device map -> plan -> fit.

:func:`prepare` is called by rank 0 of a real load (through :func:`prepare_load`, from the
ranks' facts) and by ``weightcast plan`` (from a cluster described on the command line), so the
command refuses exactly what a load refuses. In order: resolve the source (local, HF hub,
object storage), refuse pickle without ``allow_pickle``, refuse remote code without
``trust_remote_code``, check the HF cache files, parse and validate the index, build the cluster
spec, the device map and the plan, check that every rank's part fits its memory, choose the
transport. The result is one frozen :class:`~weightcast.orchestrator.order.LoadOrder`.

What needs the model layer or an object-store client (whether a config needs remote code, a
transformers model's own tp plan, the init seed, ``dtype="auto"``'s fallback, opening an
``s3://`` checkpoint) comes from the caller's :class:`ModelHooks`, so this module stays in the
orchestrator layer. Not collective.
"""
from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

from weightcast.orchestrator.cluster import ClusterSpec, cluster_from_facts, load_cluster
from weightcast.orchestrator.errors import ConfigError, DeviceMapError, RemoteCodeRefusedError, StorageError
from weightcast.orchestrator.order import LoadOrder
from weightcast.orchestrator.request import LoadRequest

CRC_PREFIX = "weightcast.crc32."
"""``__metadata__`` key prefix of a tensor's crc32 (8 hex digits), for ``verify_checksums``."""


class ModelHooks(Protocol):
    """What :func:`prepare` asks the model layer and the storage clients (workers provide it)."""

    def needs_remote_code(self, model: Any, config: dict) -> bool: ...

    def tp_rules(self, request: LoadRequest, src: Any, shapes: dict[str, tuple[int, ...]],
                 cluster: ClusterSpec) -> tuple[dict, int] | None: ...

    def init_seed(self) -> int: ...

    def auto_dtype(self, index: Any) -> str | None: ...

    def open_object(self, request: LoadRequest) -> tuple[Any, Any]: ...

    def model_targets(self, request: LoadRequest, src: Any, names: list[str]) -> dict[str, str]: ...


def choose_transport(transport: str, cluster: ClusterSpec) -> str:
    """The transport rule: ``"auto"`` is ``collective`` when any rank holds a CUDA device,
    ``node-shared`` otherwise; an explicit choice stands."""
    if transport != "auto":
        return transport
    return "collective" if any(r.device.startswith("cuda") for r in cluster.ranks) else "node-shared"


def cluster_spec_arg(cluster: Any) -> ClusterSpec | None:
    """``load_pretrained``'s ``cluster`` argument as a ClusterSpec (a spec, a YAML path or a
    shipped name), or None when it is None."""
    if cluster is None:
        return None
    return cluster if isinstance(cluster, ClusterSpec) else load_cluster(os.fspath(cluster))


def cluster_for(request: LoadRequest, facts: Sequence[dict]) -> ClusterSpec:
    """The load's cluster: the ranks' real topology (hosts, local ranks, devices, memory) from
    their facts; storage and bandwidths from the ``cluster`` argument when given."""
    facts = [{k: v for k, v in f.items() if k != "local_source"} for f in facts]
    spec = cluster_spec_arg(request.cluster)
    if spec is None:
        return cluster_from_facts(facts)
    if spec.world_size != len(facts):
        raise ConfigError("The cluster spec does not match the job", where="cluster argument",
                          expected=f"{len(facts)} ranks (the job's world size)", got=f"{spec.world_size} ranks",
                          fix="pass a cluster spec with as many ranks as the job, or cluster=None to detect it")
    return cluster_from_facts(facts, template=spec)


def prepare_load(request: LoadRequest, facts: Sequence[dict], hooks: ModelHooks, load_id: str) -> LoadOrder:
    """Rank 0 of a load: check the nodes' own copies (node-local storage), then :func:`prepare`
    on the cluster the ranks' facts describe."""
    if any("local_source" in f for f in facts):
        check_node_copies(facts)
    return prepare(request, cluster_for(request, facts), hooks, load_id=load_id, node=facts[0]["host"])


def prepare(request: LoadRequest, cluster: ClusterSpec, hooks: ModelHooks, *, load_id: str = "",
            node: str | None = None, gap_bytes: int = 0) -> LoadOrder:
    """Resolve, check, map, plan and fit-check one load on ``cluster`` (see the module doc).
    ``node``: the host whose view of the source is resolved (``{node}`` in a path)."""
    return prepare_with_index(request, cluster, hooks, load_id=load_id, node=node, gap_bytes=gap_bytes)[0]


def prepare_with_index(request: LoadRequest, cluster: ClusterSpec, hooks: ModelHooks, *, load_id: str = "",
                       node: str | None = None, gap_bytes: int = 0) -> tuple[LoadOrder, Any]:
    """:func:`prepare`, also returning the checkpoint's index (None for pickle checkpoints), for
    callers that report on it (``weightcast plan``)."""
    node = node or cluster.ranks[0].node
    src, index = _open(request, hooks, node)
    if src.kind == "pickle":
        return LoadOrder("pickle", src.root, src.config, "pickle", load_id, files=tuple(src.weight_files),
                         init_seed=hooks.init_seed()), None
    if index is None:  # a local or hub checkpoint (object storage was indexed by _open)
        refuse_remote_code(request, src.config, hooks)
        check_cache_files(src)
        index = _load_index(request, node, src)
    return _plan_order(request, cluster, hooks, src, index, load_id, gap_bytes), index


def _open(request: LoadRequest, hooks: ModelHooks, node: str) -> tuple[Any, Any]:
    """(source, index or None): an object-store checkpoint is indexed with its headers'
    ranged GETs right away (after the remote-code check); a local one later."""
    from weightcast.orchestrator.object_source import is_object_url, load_object_index
    from weightcast.orchestrator.source import resolve_source
    if is_object_url(request.source):
        store, ckpt = hooks.open_object(request)
        src = ckpt.source
        if src.kind == "pickle":
            return src, None
        refuse_remote_code(request, src.config, hooks)
        return src, load_object_index(store, ckpt)
    src = resolve_source(request.node_source(node), revision=request.revision, cache_dir=request.cache_dir,
                         local_files_only=request.local_files_only, token=request.token,
                         allow_pickle=request.allow_pickle)
    return src, None


def _load_index(request: LoadRequest, node: str, src: Any) -> Any:
    """The index of the file the source names (an explicit ``model.safetensors`` beside an
    index loads that file, as from_pretrained does), else of the checkpoint directory."""
    from weightcast.orchestrator.checkpoint import load_index
    path = os.path.expanduser(request.node_source(node))
    target = os.path.abspath(path) if os.path.isfile(path) and path.endswith(".safetensors") else src.root
    return load_index(target, cache_root=src.cache_root)


def _plan_order(request: LoadRequest, cluster: ClusterSpec, hooks: ModelHooks, src: Any, index: Any,
                load_id: str, gap_bytes: int) -> LoadOrder:
    from weightcast.orchestrator.device_map import build_device_map
    from weightcast.orchestrator.planner import PlanOptions, plan_load
    from weightcast.orchestrator.safetensors_dtypes import check_loadable_dtypes
    check_loadable_dtypes(index.tensors)
    model_tp = None
    if isinstance(request.device_map, str) and request.device_map == "tp":
        model_tp = hooks.tp_rules(request, src, {t.name: tuple(t.shape) for t in index.tensors}, cluster)
    dm = build_device_map(index, cluster, request.device_map, max_memory=request.max_memory,
                          tp_size=request.tp_size, config=src.config, key_rules=model_tp[0] if model_tp else None)
    transport = choose_transport(request.transport, cluster)
    if request.transport == "auto" and not request.zero_copy:  # private memory: read, never map
        transport = "collective"
    options = PlanOptions(transport=transport, chunk_bytes=request.chunk_bytes, bucket_bytes=request.bucket_bytes,
                          gap_bytes=gap_bytes)
    plan = plan_load(index, cluster, dm, options)
    check_fits(plan, cluster, index)
    return LoadOrder("safetensors", src.root, src.config, transport, load_id, checkpoint_bytes=index.total_bytes,
                     plan=plan, device_map=dm, init_seed=hooks.init_seed(), auto_dtype=hooks.auto_dtype(index),
                     model_tp_size=model_tp[1] if model_tp else None,
                     crc32=checksums_of(index) if request.verify_checksums else None,
                     disk=disk_placements(dm, index) or None,
                     targets=_targets(request, hooks, src, index, dm) if not model_tp else None,
                     file_ids=file_ids(src.root, [f.name for f in index.files]))


def file_ids(root: str, names: list[str]) -> dict[str, tuple[int, int]] | None:
    """``{file: (inode, ctime_ns)}`` of local checkpoint files (None for object storage): what a
    rank compares before it maps them (``weightcast.workers.file_guard``)."""
    if "://" in root:
        return None
    out = {}
    for name in names:
        st = os.stat(os.path.join(root, name))
        out[name] = (st.st_ino, st.st_ctime_ns)
    return out


def _targets(request: LoadRequest, hooks: ModelHooks, src: Any, index: Any, dm: Any) -> dict[str, str] | None:
    """A model spread over ranks: which parameter each renamed checkpoint key loads into."""
    if dm.strategy in ("replicate", "tp"):
        return None
    targets = hooks.model_targets(request, src, list(index.names))
    if dm.strategy == "fsdp":
        from weightcast.orchestrator.key_mapping import refuse_converted_fsdp
        refuse_converted_fsdp(targets)
        return None
    return targets or None


def disk_placements(dm: Any, index: Any) -> dict[str, tuple[str, int]]:
    """``{checkpoint tensor: (file, rank)}`` of every tensor the map puts on a rank's disk."""
    return {name: (index.tensor(name).file, p.rank) for name, p in dm.placements.items()
            if getattr(p, "device", None) == "disk"}


def refuse_remote_code(request: LoadRequest, config: dict | None, hooks: ModelHooks) -> None:
    """Before reading any weight: a transformers model whose config.json asks for remote code
    (``auto_map``) that transformers has no class for needs ``trust_remote_code=True`` (a
    native model type carrying an ``auto_map`` loads with the library's class, as in
    from_pretrained)."""
    if request.trust_remote_code or not config or not config.get("auto_map") or request.model is None:
        return
    if hooks.needs_remote_code(request.model, config):
        raise RemoteCodeRefusedError("config.json asks for remote code (auto_map)", where="config.json",
                                     got=f"auto_map={config['auto_map']!r}"[:300],
                                     fix="review that code and pass trust_remote_code=True, or pass model=<factory>")


def check_cache_files(src: Any) -> None:
    """An HF cache snapshot: every weight file must be a sound link into the blobs."""
    if not src.cache_root:
        return
    from weightcast.orchestrator.cache_doctor import check_snapshot_files
    check_snapshot_files(src.root, list(src.weight_files))


def check_fits(plan: Any, cluster: ClusterSpec, index: Any) -> None:
    """Refuse a plan in which a rank owns more bytes than its device (host, for CPU) memory,
    before any byte is read (a small sparse file can declare a terabyte tensor)."""
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


def checksums_of(index: Any) -> dict[str, tuple[str, str]]:
    """``verify_checksums``: ``{tensor: (file, crc32)}`` from the files' ``__metadata__`` entries
    ``weightcast.crc32.<tensor>`` (8 hex digits of zlib.crc32 of the tensor's bytes)."""
    out = {}
    for f in index.files:
        for key, value in f.metadata.items():
            if key.startswith(CRC_PREFIX):
                out[key[len(CRC_PREFIX):]] = (f.name, value)
    if not out:
        raise ConfigError("verify_checksums needs checksums in the checkpoint", where=index.root,
                          expected=f"__metadata__ entries '{CRC_PREFIX}<tensor>' in the safetensors headers",
                          got="none", fix="write them with weightcast.checksum_metadata(state_dict) as "
                          "the files' metadata, or load without verify_checksums")
    return out


def check_node_copies(facts: Sequence[dict]) -> None:
    """Node-local storage: every node must hold the same files (same commit, sizes)."""
    from weightcast.orchestrator.cache_doctor import compare_snapshots
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
