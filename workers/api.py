"""``load_pretrained``: the one public per-rank call.

Every rank of the job calls it with the same arguments (collective). Rank 0 resolves the source,
parses the index, builds the cluster-wide device map and the plan, and broadcasts it (or its
error); every rank then reads its byte ranges, moves bytes per the plan's transport, and
materializes what it owns. See the README for the arguments.
"""
from __future__ import annotations

import os
import uuid
from typing import Any

import torch

from weightcast.orchestrator.errors import ConfigError
from weightcast.orchestrator.plan_codec import decode_order
from weightcast.orchestrator.request import LoadRequest
from weightcast.workers import liveness
from weightcast.workers.coordinator import coordinate, gather_facts
from weightcast.workers.group import Group
from weightcast.workers.process_group import setup_group, teardown_group
from weightcast.workers.execute import execute_plan, plan_on_rank0, resolve_node_local
from weightcast.workers.loading_info import LoadingInfo
from weightcast.workers.finish import report as report_loading
from weightcast.workers.materialize import resolve_dtype
from weightcast.workers.hf_model import is_hf_class
from weightcast.workers.model_load import take_loading_info
from weightcast.workers.testing import at_phase
from weightcast.workers.report import LoadReport, PhaseClock, gather_reports, memory_now, summary


def load_pretrained(source: str, *, revision: str | None = None, cache_dir: str | None = None,
                    local_files_only: bool | None = None, token: str | None = None,
                    model: Any = "auto", device_map: Any = "replicate", dtype: Any = "auto",
                    torch_dtype: Any = None, max_memory: dict | None = None, tp_size: int | None = None,
                    cluster: Any = None, transport: str = "auto", allow_pickle: bool = False,
                    trust_remote_code: bool = False, strict: bool = True, timeout: float = 300.0,
                    bucket_bytes: int = 256 << 20, chunk_bytes: int = 64 << 20, threads: int = 4,
                    progress: bool = True, return_report: bool = False, report_memory: bool = True,
                    verify_checksums: bool = False, key_mapping: dict | None = None,
                    storage_options: dict | None = None,
                    output_loading_info: bool = False, zero_copy: bool = True, **model_kwargs: Any) -> Any:
    """Load ``source`` onto every rank of the job; returns this rank's model (or state dict).

    Collective: every rank calls it with the same arguments. ``model``: ``"auto"`` (transformers
    class from config.json), a transformers model class or auto class
    (``AutoModelForSequenceClassification``), a factory returning an ``nn.Module`` (built on meta),
    an ``nn.Module`` on meta, or ``None`` for a ``dict[str, Tensor]`` of what this rank owns.
    Other keyword arguments are ``from_pretrained``'s config overrides (``num_labels=3``).
    Parameters the checkpoint lacks are initialised as ``from_pretrained`` initialises them (the
    same values on every rank) unless ``strict`` (the default) refuses the load;
    ``output_loading_info=True`` returns ``(model, loading_info)`` with from_pretrained's dict
    (missing / unexpected / mismatched keys, error messages); otherwise rank 0 logs a warning.
    ``device_map``: ``"replicate" | "auto" | "tp" | dict | ClusterDeviceMap | JSON path``.
    ``zero_copy=False``: every tensor in this rank's private memory (``transport="auto"`` then
    reads with the collective transport; node-shared views are copied), so a checkpoint file
    changed or truncated after the load can neither change the tensors nor fault on touch.
    ``dtype`` (alias ``torch_dtype``): ``"auto"``, a ``torch.dtype`` or its name.
    ``transport``: ``"auto"`` (node-shared for CPU targets, collective for CUDA), or either.
    ``key_mapping``: ``{regex: replacement}`` applied to checkpoint keys before transformers' own
    conversion mapping, as ``from_pretrained(key_mapping=...)``.
    With ``return_report=True`` returns ``(result, report)`` (``(model, loading_info, report)``
    with ``output_loading_info``), the report being the gathered
    summary of every rank (same dict on every rank). Its memory figures (PSS, private bytes)
    are read after touching every page this rank holds; ``report_memory=False`` skips that
    probe (they are then ``None``) for callers that measure memory themselves.
    Any failure on any rank raises on every rank within ``timeout`` seconds.
    ``source`` may be ``s3://bucket/prefix`` or ``s3://bucket/key.safetensors``; boto3 finds
    credentials, endpoint and region in the standard places, ``storage_options`` (keys of
    ``weightcast.workers.s3.S3Options``) overrides them and sets request size and concurrency.
    """
    request = LoadRequest.from_call(locals())
    from weightcast.workers.convert import check_key_mapping
    check_key_mapping(request.key_mapping)
    if model_kwargs and not (isinstance(model, str) and model == "auto" or is_hf_class(model)):
        raise ConfigError("Unknown keyword arguments", where="load_pretrained(...)", got=sorted(model_kwargs),
                          expected="config overrides only with model='auto' or a transformers class",
                          fix="check the argument names, or pass a transformers model class")
    if isinstance(source, str) and source.startswith("s3://"):
        from weightcast.workers.s3 import prewarm
        prewarm(request.storage_options)  # the client is built while the group forms and rank 0 plans
    group = setup_group(request.timeout)
    ok = False
    try:
        liveness.start_for(group, os.environ.get("MASTER_ADDR"))
        result, report = _load(group, request)
        ok = True
    finally:
        if liveness.of(group) is not None:
            liveness.of(group).stop()
        teardown_group(group, ok)  # the default group stays: the model may need it (TP)
    info = take_loading_info(result)
    if output_loading_info:
        result = (result, (info or LoadingInfo()).to_dict())
    elif info is not None and group.rank == 0:
        report_loading(info, type(result).__name__, source)
    if return_report:
        return (*result, report) if output_loading_info else (result, report)
    return result


def _device_for(group: Group) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", group.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _load(group: Group, request: LoadRequest) -> tuple[Any, dict | None]:
    clock = PhaseClock()
    device = _device_for(group)
    facts = {"rank": group.rank, "local_rank": group.local_rank, "host": group.node, "device": str(device),
             "device_memory": _device_memory(device), "host_memory": _host_memory()}
    clock.start("plan")
    error = None
    try:
        at_phase("plan", group.rank)
        resolve_dtype(request.dtype, None)  # a bad dtype fails every rank before any byte is read
    except BaseException as exc:  # noqa: BLE001 - exchanged with the facts: every rank raises
        if isinstance(exc, KeyboardInterrupt) and group.world_size == 1:
            raise
        error = exc
    local = resolve_node_local(group, request)
    if local is not None:
        facts["local_source"] = local
    all_facts = gather_facts(group, facts, error)
    order = decode_order(coordinate(group, lambda: plan_on_rank0(request, all_facts, uuid.uuid4().hex[:12])))
    if local is not None and "root" in local:
        order = order.with_local_copy(local["root"], local["stamps"])
    clock.stop("plan")
    result, stats, plan = execute_plan(group, request, order, device, clock)
    report = LoadReport(rank=group.rank, node=group.node, device=str(device), transport=order.transport)
    report.read_bytes, report.recv_bytes, report.sent_bytes = stats.read_bytes, stats.recv_bytes, stats.sent_bytes
    report.cross_node_sent, report.cross_node_recv = stats.cross_node_sent, stats.cross_node_recv
    report.staged_bytes = stats.staged_bytes
    report.owned_bytes = stats.owned_bytes
    report.unleased_files = stats.unleased
    report.seconds = clock.elapsed()
    report.phases = clock.phases
    for name, start, end in stats.events:  # read / transfer / views inside the move phase
        report.phases[name] = [start - clock.t0, end - clock.t0]
    report.timeline = stats.timeline.compact(since=clock.t0)  # every read, send and receive
    if not request.return_report:
        return result, None
    if request.report_memory:
        _touch(result)
        report.__dict__.update(memory_now())
    reports = gather_reports(group, report)
    return result, summary(reports, order.checkpoint_bytes, max(r.seconds for r in reports))


def _touch(result: Any) -> None:
    """Fault in every page of every tensor this rank holds (DTensors: their local shard; tensors
    on meta: nothing), so memory figures count what the load owns. ``MADV_POPULATE_READ`` where
    the kernel has it: a page of a file truncated meanwhile is skipped, not a SIGBUS."""
    from weightcast.workers.file_guard import populate
    tensors = result.values() if isinstance(result, dict) else list(result.state_dict().values())
    cpu = [t for t in (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
           if t.device.type == "cpu" and t.numel() and t.is_contiguous() and t.dtype != torch.bool]
    if not populate(cpu):  # an old kernel: read one byte per page
        for t in cpu:
            t.reshape(-1).view(torch.uint8)[::4096].sum()


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return _host_memory()


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
