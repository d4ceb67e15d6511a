"""Forming and ending a load's process groups.

:func:`setup_group` (every rank, first thing in a load) joins the user's default group or the
torchrun environment and creates the load's two gloo groups; :func:`teardown_group` keeps them
for the next load when this one ended well, else destroys them; :func:`abort_phase` drops the
phase group of a failing rank so its peers fail at once.
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from weightcast.orchestrator.errors import LoadError
from weightcast.workers.collectives import all_gather_bytes
from weightcast.workers.group import Group


def setup_group(timeout: float, env: dict[str, str] | None = None) -> Group:
    """Join (or start) the process group. Called by every rank, first thing in a load.

    Uses an initialised default group if there is one; else the torchrun environment
    (``env://``; nccl when CUDA is available, gloo otherwise); else a single rank.
    Two gloo groups with ``timeout`` are created either way, so a dead peer becomes an error
    within ``timeout`` even when the user's group has the 30-minute default: ``pg`` for the
    coordination round and the status exchanges, and ``phase_pg`` for what happens
    inside a phase (the data itself on CPU, barriers), which a failing rank drops
    (:func:`abort_phase`) so that peers waiting on it fail at once. The two groups of a load that
    ended well on every rank are kept for the next load in the same process (see
    :func:`teardown_group`): creating a gloo group and freeing one cost tens of milliseconds
    with 4 ranks, a large part of a small load.
    """
    env = dict(os.environ if env is None else env)
    node = env.get("WEIGHTCAST_NODE") or socket.gethostname()
    td = timedelta(seconds=timeout)
    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        if not ("RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env):
            return Group(0, 1, 0, 1, node, timeout=timeout)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        _joining(env, timeout, lambda: dist.init_process_group(backend=backend, init_method="env://", timeout=td))
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(env.get("LOCAL_RANK", rank))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if world == 1:
        return Group(0, 1, 0, 1, node, timeout=timeout, owns_default=owns)
    default_backend = dist.get_backend()
    pg, phase_pg = _control_groups(env, timeout)
    data_pg = phase_pg if default_backend == "gloo" else dist.group.WORLD
    group = Group(rank, world, local_rank, local_world, node, pg, data_pg, timeout, owns, phase_pg=phase_pg)
    me = json.dumps([socket.gethostname(), os.getpid()]).encode()
    group.processes = tuple(tuple(json.loads(b)) for b in all_gather_bytes(group, me, "joining the load"))
    return group


def _joining(env: dict[str, str], timeout: float, fn: Callable[[], Any]) -> Any:
    """Run a group-forming call; a peer that never joins becomes a LoadError after ``timeout``."""
    try:
        return fn()
    except (RuntimeError, ValueError) as exc:
        raise LoadError("The ranks could not form a process group", where=f"rank {env.get('RANK', '?')} "
                        f"(MASTER_ADDR={env.get('MASTER_ADDR')}, MASTER_PORT={env.get('MASTER_PORT')})",
                        got=f"{type(exc).__name__}: {str(exc)[:300]}",
                        fix=f"start every rank of the job within timeout={timeout:g} s with the same "
                            "MASTER_ADDR/MASTER_PORT/WORLD_SIZE; check that no rank died at start") from exc


# The control groups of the last load that ended well: (default group, timeout, pg, phase_pg).
_KEPT: list[tuple] = []


def _control_groups(env: dict[str, str], timeout: float) -> tuple[Any, Any]:
    """The load's two gloo groups: those kept by the previous load when they belong to the same
    default group and timeout (every rank kept them: that load ended well everywhere), else new
    ones (collective over the default group)."""
    if _KEPT:
        world, kept_timeout, pg, phase_pg = _KEPT.pop()
        if world is dist.group.WORLD and kept_timeout == timeout and _registered(pg) and _registered(phase_pg):
            return pg, phase_pg
        _destroy(phase_pg, pg)
    td = timedelta(seconds=timeout)
    pg = _joining(env, timeout, lambda: dist.new_group(backend="gloo", timeout=td))
    phase_pg = _joining(env, timeout, lambda: dist.new_group(backend="gloo", timeout=td))
    return pg, phase_pg


def _registered(pg: Any) -> bool:
    try:
        dist.get_process_group_ranks(pg)
        return True
    except (KeyError, RuntimeError, ValueError):  # destroyed since (e.g. with the default group)
        return False


def _destroy(*pgs: Any) -> None:
    for pg in pgs:
        if pg is not None and pg is not dist.group.WORLD and _registered(pg):
            try:
                dist.destroy_process_group(pg)
            except (RuntimeError, ValueError):  # after a failed load the group may be broken
                pass


def teardown_group(group: Group, ok: bool = False) -> None:
    """End a load's use of its groups (every rank calls it). After a load that ended well on
    every rank (``ok``, with its phase group intact) the groups are kept for the next load of
    this process; otherwise they are destroyed. The default group stays initialised, created by
    this load or not: the loaded model may use it."""
    phase_pg, group.phase_pg = group.phase_pg, None
    if ok and group.pg is not None and phase_pg is not None and dist.is_initialized():
        release_kept()
        _KEPT.append((dist.group.WORLD, group.timeout, group.pg, phase_pg))
        return
    _destroy(phase_pg, group.pg)


@atexit.register
def release_kept() -> None:
    """Destroy and free the control groups kept for a next load (not collective; also runs at
    exit): a gloo group still alive while the interpreter shuts down can abort the process
    ("terminate called without an active exception")."""
    if not _KEPT:
        return
    while _KEPT:
        _destroy(*_KEPT.pop()[2:])
    gc.collect()  # the last references go now, while the interpreter is whole


def abort_phase(group: Group, error: BaseException | None = None) -> None:
    """Drop this load's phase group (a rank whose phase failed calls it before the status
    exchange). Its connections close, so peers blocked in a transfer or a barrier with this
    rank fail at once instead of after ``timeout``, and every rank meets in the status exchange
    on ``group.pg``. ``error``'s frames are cleared: pending requests there hold the group."""
    pg, group.phase_pg = group.phase_pg, None
    if pg is None:
        return
    if group.data_pg is pg:
        group.data_pg = None
    if error is not None:
        traceback.clear_frames(error.__traceback__)
    try:
        dist.destroy_process_group(pg)
    except (RuntimeError, ValueError):
        pass
    del pg
    gc.collect()  # the last reference goes: gloo closes the connections
