"""The coordination round and the small collectives every load uses.

Every function here is collective over the load's :class:`Group`: all ranks call it, in the same
order. Payloads travel as one ``bytes`` blob in a uint8 tensor (object collectives pickle
nested objects and cost seconds for megabytes). A failure on rank 0 while planning is broadcast
instead of the plan, so every rank raises the same error; failures on any rank inside a phase
are exchanged by :func:`sync_status`, so every rank raises a :class:`LoadError` naming the
failing rank, its host and the cause.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from orchestrator.errors import LoadError, WeightcastError


@dataclass
class Group:
    """The ranks of one load. ``pg`` is a gloo group with the load's timeout (None: one rank);
    ``data_pg`` moves tensor data (the same group on CPU, the NCCL default group on CUDA)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: str
    pg: Any = None
    data_pg: Any = None
    timeout: float = 300.0
    owns_default: bool = False
    extra: dict = field(default_factory=dict)


def setup_group(timeout: float, env: dict[str, str] | None = None) -> Group:
    """Join (or start) the process group. Called by every rank, first thing in a load.

    Uses an initialised default group if there is one; else the torchrun environment
    (``env://``; nccl when CUDA is available, gloo otherwise); else a single rank.
    A gloo control group with ``timeout`` is created either way, so a dead peer becomes an
    error within ``timeout`` even when the user's group has the 30-minute default.
    """
    env = dict(os.environ if env is None else env)
    node = env.get("WEIGHTCAST_NODE") or socket.gethostname()
    td = timedelta(seconds=timeout)
    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        if not ("RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env):
            return Group(0, 1, 0, 1, node, timeout=timeout)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=td)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(env.get("LOCAL_RANK", rank))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if world == 1:
        return Group(0, 1, 0, 1, node, timeout=timeout, owns_default=owns)
    default_backend = dist.get_backend()
    pg = dist.new_group(backend="gloo", timeout=td)
    data_pg = pg if default_backend == "gloo" else dist.group.WORLD
    return Group(rank, world, local_rank, local_world, node, pg, data_pg, timeout, owns)


def teardown_group(group: Group) -> None:
    """Destroy the control group of a finished load (every rank calls it). The default group
    stays initialised, created by this load or not: the loaded model may use it."""
    if group.pg is not None and group.pg is not dist.group.WORLD:
        dist.destroy_process_group(group.pg)


def broadcast_bytes(group: Group, blob: bytes | None, src: int = 0) -> bytes:
    """Broadcast one bytes blob from ``src``; every rank gets it (collective)."""
    if group.world_size == 1:
        assert blob is not None
        return blob
    size = torch.tensor([len(blob) if group.rank == src else 0], dtype=torch.int64)
    dist.broadcast(size, src, group=group.pg)
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if group.rank == src:
        buf.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else buf)
    dist.broadcast(buf, src, group=group.pg)
    return buf.numpy().tobytes()


def all_gather_bytes(group: Group, blob: bytes) -> list[bytes]:
    """Every rank contributes one blob and receives everyone's, in rank order (collective)."""
    if group.world_size == 1:
        return [blob]
    size = torch.tensor([len(blob)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(group.world_size)]
    dist.all_gather(sizes, size, group=group.pg)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if blob:
        mine[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(group.world_size)]
    dist.all_gather(bufs, mine, group=group.pg)
    return [b[:int(s.item())].numpy().tobytes() for b, s in zip(bufs, sizes)]


def barrier(group: Group) -> None:
    """All ranks wait for each other (collective; bounded by the group's timeout)."""
    if group.world_size > 1:
        all_gather_bytes(group, b"")


def gather_facts(group: Group, facts: dict) -> list[dict]:
    """Every rank's facts (host, local rank, device, memory), in rank order (collective)."""
    blobs = all_gather_bytes(group, json.dumps(facts, sort_keys=True).encode())
    return [json.loads(b) for b in blobs]


def _encode_error(exc: BaseException, group: Group) -> bytes:
    if isinstance(exc, WeightcastError):
        try:
            return b"E" + pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - fall back to a LoadError carrying the message
            pass
    cause = f"{type(exc).__name__}: {exc}"
    err = LoadError("Planning the load failed", where=f"rank {group.rank} on host {group.node}",
                    got=cause, fix="see the cause; the traceback is in the log of that rank")
    return b"E" + pickle.dumps(err)


def coordinate(group: Group, plan_fn: Callable[[], dict]) -> dict:
    """Rank 0 runs ``plan_fn`` (resolve, index, device map, plan) and broadcasts its JSON-able
    result or its exception; every rank returns the same dict or raises the same error."""
    blob = None
    if group.rank == 0:
        try:
            blob = b"P" + json.dumps(plan_fn(), separators=(",", ":")).encode()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach every rank
            if isinstance(exc, KeyboardInterrupt) and group.world_size == 1:
                raise
            traceback.print_exc() if not isinstance(exc, WeightcastError) else None
            blob = _encode_error(exc, group)
    blob = broadcast_bytes(group, blob)
    if blob[:1] == b"E":
        raise pickle.loads(blob[1:])  # noqa: S301 - produced by rank 0 of this load
    return json.loads(blob[1:])


def sync_status(group: Group, phase: str, error: BaseException | None) -> None:
    """End of a phase: every rank reports ok or its error; if any rank failed, every rank
    raises a LoadError naming the first failing rank, its host and its cause (collective)."""
    mine = b"" if error is None else json.dumps(
        {"node": group.node, "type": type(error).__name__, "msg": str(error)}).encode()
    reports = all_gather_bytes(group, mine)
    failed = [(r, json.loads(b)) for r, b in enumerate(reports) if b]
    if not failed:
        return
    rank, info = failed[0]
    others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
    err = LoadError(f"The load failed during {phase} on rank {rank}{others}",
                    where=f"rank {rank} on host {info['node']}",
                    got=f"{info['type']}: {info['msg']}",
                    fix="fix the cause on that rank and run the load again")
    raise err from error
