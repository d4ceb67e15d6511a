"""``load_training_state``: resume a Trainer (or accelerate) checkpoint with every byte of the
optimizer state read once per cluster.

Collective: every rank of the job calls it with the same arguments. Steps:

1. **Weights** (``weights=True``): :func:`weightcast.workers.api.load_pretrained` of the
   checkpoint's safetensors with ``model=None`` (``device_map="fsdp"`` when the model's parameters
   are FSDP2 DTensors, else ``"replicate"``); the tensors are kept until step 5.
2. **Plan** (rank 0): find the files (``optimizer.pt`` / ``optimizer.bin``, ``scheduler.pt`` /
   ``scheduler.bin``, ``scaler.pt``, the RNG files, ``trainer_state.json``), parse the optimizer
   file's zip directory and ``data.pkl`` (:mod:`weightcast.orchestrator.torch_zip`), place its
   tensors per rank 0's optimizer (:mod:`weightcast.orchestrator.training_plan`) and plan them
   like safetensors tensors; broadcast the plan or the error.
3. **Move** (every rank): the plan's reads and transfers by the node-shared or collective
   transport; each rank receives the whole state (DDP) or its ``Shard(0)`` rows (FSDP2).
4. **Small files** (every rank): scheduler, scaler and this rank's RNG file with
   ``torch.load(weights_only=True)``.
5. **Apply** (every rank, only after every rank finished 1-4): weights copied into the model,
   the optimizer state given to ``optimizer.load_state_dict`` (FSDP2 state as ``Shard(0)``
   DTensors on the parameter's mesh: the sharded state ``get_optimizer_state_dict`` returns and
   ``set_optimizer_state_dict`` takes), scheduler, scaler and RNG restored.

Any failure in 1-4 on any rank raises on every rank and leaves model, optimizer, scheduler and RNG
untouched. RNG policy (``rng``): ``"restore"`` needs one RNG file per rank of this job
(``rng_state.pth`` for one process, ``rng_state_<rank>.pth`` for several) and refuses another world
size with a :class:`ConfigError` naming the fix; ``"skip"`` keeps the current RNG state (the
explicit opt-in when the world size changed).
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import torch

from weightcast.orchestrator.errors import CheckpointNotFoundError, ConfigError
from weightcast.workers.coordinator import coordinate, gather_facts, run_step
from weightcast.workers.group import Group
from weightcast.workers.process_group import setup_group, teardown_group
from weightcast.workers.training_files import apply_rng, find_files, load_small_files

RNG_POLICIES = ("restore", "skip")


def load_training_state(checkpoint_dir: str, model: torch.nn.Module | None = None, optimizer: Any = None,
                        scheduler: Any = None, *, scaler: Any = None, weights: bool = True, rng: str = "restore",
                        transport: str = "auto", timeout: float = 300.0, threads: int = 4,
                        return_report: bool = False) -> Any:
    """Restore a checkpoint directory's training state on every rank; returns the parsed
    ``trainer_state.json`` (``{}`` when absent), or ``(state, report)`` with ``return_report``.

    Collective. ``model`` gets the weights (``weights=False`` skips them); ``optimizer``,
    ``scheduler``, ``scaler`` get their saved states when given (a missing file is an error);
    ``rng``: ``"restore"`` or ``"skip"`` (see the module docstring).
    """
    if rng not in RNG_POLICIES:
        raise ConfigError("Unknown rng policy", where="load_training_state(rng=...)",
                          expected=f"one of {RNG_POLICIES}", got=repr(rng))
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointNotFoundError("The checkpoint directory does not exist", where=str(checkpoint_dir),
                                      fix="pass a checkpoint-N directory written by Trainer or save_training_state")
    report: dict = {"weights": None, "optimizer": None}
    loaded = None
    if weights and model is not None:
        loaded, report["weights"] = _load_weights(checkpoint_dir, model, transport, timeout, threads)
    group = setup_group(timeout)
    ok = False
    try:
        result = _resume(group, checkpoint_dir, model, loaded, optimizer, scheduler, scaler, rng,
                         transport, threads, report)
        ok = True
    finally:
        teardown_group(group, ok)
    return (result, report) if return_report else result


def _load_weights(checkpoint_dir: str, model: torch.nn.Module, transport: str, timeout: float,
                  threads: int) -> tuple[dict, dict]:
    from weightcast.workers.api import load_pretrained
    from weightcast.workers.training_apply import is_fsdp
    device_map = "fsdp" if is_fsdp(model) else "replicate"
    with torch.random.fork_rng(devices=[]):  # the load draws an init seed on rank 0: keep the job's RNG
        return load_pretrained(checkpoint_dir, model=None, device_map=device_map, dtype=None, transport=transport,
                               timeout=timeout, threads=threads, progress=False, return_report=True,
                               report_memory=False)


def _resume(group: Group, checkpoint_dir: str, model: Any, loaded: dict | None, optimizer: Any,
            scheduler: Any, scaler: Any, rng: str, transport: str, threads: int, report: dict) -> dict:
    from weightcast.workers.api import _device_for, _device_memory, _host_memory
    from weightcast.workers.training_apply import apply_all, optimizer_layouts
    device = _device_for(group)
    facts = {"rank": group.rank, "local_rank": group.local_rank, "host": group.node, "device": str(device),
             "device_memory": _device_memory(device), "host_memory": _host_memory()}
    error, layouts = None, None
    try:
        layouts = optimizer_layouts(optimizer) if optimizer is not None else None
    except BaseException as exc:  # noqa: BLE001 - exchanged with the facts: every rank raises
        error = exc
    all_facts = gather_facts(group, facts, error)
    want = {"optimizer": optimizer is not None, "scheduler": scheduler is not None,
            "scaler": scaler is not None, "rng": rng == "restore"}
    payload = json.loads(coordinate(group, lambda: json.dumps(
        _plan_on_rank0(checkpoint_dir, want, layouts, all_facts, transport), separators=(",", ":")).encode()))
    state = run_step(group, "transfer", lambda: _move_optimizer(group, payload, device, threads))
    stats = state.pop("__stats__") if state is not None else None
    small = run_step(group, "read", lambda: load_small_files(payload["files"], group.rank, want))
    meta = payload["optimizer"]
    run_step(group, "materialize", lambda: apply_all(model, loaded, optimizer, state, meta, scheduler, scaler, small))
    if want["rng"]:
        apply_rng(small.get("rng"))
    if stats is not None:
        report["optimizer"] = _gather_stats(group, stats)
    return payload["trainer_state"]


def _gather_stats(group: Group, stats: dict) -> list[dict]:
    """Every rank's optimizer byte counts, in rank order (collective)."""
    from weightcast.workers.collectives import all_gather_bytes
    return [json.loads(b) for b in all_gather_bytes(group, json.dumps(stats).encode(), "the report")]


def _plan_on_rank0(checkpoint_dir: str, want: dict, layouts: Any, facts: list[dict], transport: str) -> dict:
    """Rank 0: find and check the files, plan the optimizer file (JSON-able payload)."""
    import base64

    from weightcast.orchestrator.cluster import cluster_from_facts
    from weightcast.orchestrator.device_map import device_map_to_json
    from weightcast.orchestrator.planner import PlanOptions, plan_load, plan_to_json
    from weightcast.orchestrator.torch_zip import parse_torch_save
    from weightcast.orchestrator.training_plan import optimizer_map, skeleton_bytes, state_index
    files = find_files(checkpoint_dir, want, len(facts))
    payload: dict = {"files": files, "trainer_state": _trainer_state(checkpoint_dir), "optimizer": None}
    if not want["optimizer"]:
        return payload
    name = files["optimizer"]
    saved = parse_torch_save(os.path.join(checkpoint_dir, name))
    index, refs = state_index(saved, name)
    cluster = cluster_from_facts(facts)
    dm = optimizer_map(index, saved.obj, layouts, cluster.world_size, cluster.devices, name)
    if transport == "auto":
        transport = "collective" if any(f["device"].startswith("cuda") for f in facts) else "node-shared"
    plan = plan_load(index, cluster, dm, PlanOptions(transport=transport))
    payload["optimizer"] = {
        "root": index.root, "transport": transport, "plan": plan_to_json(plan).decode(),
        "device_map": device_map_to_json(dm), "load_id": uuid.uuid4().hex[:12],
        "skeleton": base64.b64encode(skeleton_bytes(saved.obj)).decode(),
        "empty": {n: [r.dtype, list(r.shape)] for n, r in refs.items() if not r.length},
        "file_bytes": saved.size, "tensor_bytes": index.total_bytes}
    return payload


def _trainer_state(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return {}
    from weightcast.orchestrator.errors import CheckpointFormatError
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointFormatError("trainer_state.json cannot be read", where=path, got=str(exc)[:300]) from None
    if not isinstance(state, dict):
        raise CheckpointFormatError("trainer_state.json is not a JSON object", where=path)
    return state


def _move_optimizer(group: Group, payload: dict, device: torch.device, threads: int) -> dict | None:
    """Every rank: read and move the optimizer file's tensors per the plan; returns
    ``{name: tensor}`` (this rank's rows of sharded ones) plus ``__stats__``."""
    opt = payload["optimizer"]
    if opt is None:
        return None
    from weightcast.orchestrator.planner import plan_from_json
    from weightcast.workers.reader import FileReader
    plan = plan_from_json(opt["plan"].encode())
    reader = FileReader(opt["root"], plan.files)
    try:
        if opt["transport"] == "node-shared":
            from weightcast.workers.staging import run_node_shared
            from weightcast.workers.staging_areas import remove_areas
            try:
                tensors, stats = run_node_shared(group, plan, opt["root"], reader, opt["load_id"], threads, False)
            except BaseException:
                remove_areas(opt["load_id"])
                raise
        else:
            from weightcast.workers.transfer import run_collective
            tensors, stats = run_collective(group, plan, reader, device, threads)
    finally:
        reader.close()
    out: dict[str, Any] = dict(tensors)
    out["__stats__"] = {"read_bytes": stats.read_bytes, "recv_bytes": stats.recv_bytes,
                        "sent_bytes": stats.sent_bytes, "file_bytes": opt["file_bytes"],
                        "tensor_bytes": opt["tensor_bytes"],
                        "owned_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    return out
