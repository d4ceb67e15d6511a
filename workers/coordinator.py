"""The coordination round and the small collectives every load uses.

Every function here is collective over the load's :class:`Group`: all ranks call it, in the same
order. Payloads travel as one ``bytes`` blob in a uint8 tensor (object collectives pickle
nested objects and cost seconds for megabytes). A failure on rank 0 while planning is broadcast
instead of the plan, so every rank raises the same error; failures on any rank inside a phase
are exchanged by :func:`sync_status`, so every rank raises a :class:`LoadError` naming the
failing rank, its host and the cause. A failing rank first drops the phase group
(:func:`abort_phase`) so peers blocked on it inside the phase fail at once. A peer that died or
went silent past the timeout makes every collective here raise a LoadError too (:func:`guarded`).
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from weightcast.orchestrator.errors import LoadError, WeightcastError


@dataclass
class Group:
    """The ranks of one load (or save). ``pg`` is a gloo group with the call's timeout (None:
    one rank), for the coordination round and status exchanges; ``phase_pg`` a second one for
    what happens inside a phase, dropped by a failing rank (:func:`abort_phase`); ``data_pg``
    moves tensor data (``phase_pg`` on CPU, the NCCL default group on CUDA). ``processes``:
    every rank's ``(host, pid)``, to name dead peers. ``watch`` and ``hook``: a save's
    liveness watch and fault hook (see :mod:`weightcast.workers.save`)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: str
    pg: Any = None
    data_pg: Any = None
    timeout: float = 300.0
    owns_default: bool = False
    phase_pg: Any = None
    processes: tuple[tuple[str, int], ...] = ()
    watch: Any = None
    hook: Callable[[str, str], None] | None = None


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


def broadcast_bytes(group: Group, blob: bytes | None, src: int = 0, what: str = "a collective step") -> bytes:
    """Broadcast one bytes blob from ``src``; every rank gets it (collective). A lost peer is a
    LoadError (see :func:`guarded`)."""
    if group.world_size == 1:
        assert blob is not None
        return blob
    return guarded(group, what, lambda: _broadcast_bytes(group, blob, src, group.pg))


def _broadcast_bytes(group: Group, blob: bytes | None, src: int, pg: Any) -> bytes:
    size = torch.tensor([len(blob) if group.rank == src else 0], dtype=torch.int64)
    dist.broadcast(size, src, group=pg)
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if group.rank == src:
        buf.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else buf)
    dist.broadcast(buf, src, group=pg)
    return buf.numpy().tobytes()


def all_gather_bytes(group: Group, blob: bytes, what: str = "a collective step") -> list[bytes]:
    """Every rank contributes one blob and receives everyone's, in rank order (collective). A
    lost peer is a LoadError (see :func:`guarded`)."""
    if group.world_size == 1:
        return [blob]
    return guarded(group, what, lambda: _all_gather_bytes(group, blob, group.pg))


def _all_gather_bytes(group: Group, blob: bytes, pg: Any) -> list[bytes]:
    size = torch.tensor([len(blob)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(group.world_size)]
    dist.all_gather(sizes, size, group=pg)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if blob:
        mine[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(group.world_size)]
    dist.all_gather(bufs, mine, group=pg)
    return [b[:int(s.item())].numpy().tobytes() for b, s in zip(bufs, sizes)]


def barrier(group: Group, what: str = "a barrier") -> None:
    """All ranks wait for each other (collective; bounded by the group's timeout). Runs on the
    phase group, so a rank failing inside the phase releases the others (see abort_phase)."""
    if group.world_size > 1:
        pg = group.phase_pg if group.phase_pg is not None else group.pg
        guarded(group, what, lambda: _all_gather_bytes(group, b"", pg))


def guarded(group: Group, what: str, fn: Callable[[], Any], own_error: BaseException | None = None) -> Any:
    """Run a collective; if it fails (a peer died, closed its connection or stayed silent past the
    group's timeout), raise a LoadError saying so, naming the ranks of this host that are no
    longer running when there are any. Called around every control collective; the data
    collectives of a phase fail inside the phase and are reported by :func:`sync_status`."""
    try:
        return fn()
    except LoadError:
        raise
    except RuntimeError as exc:  # torch.distributed's errors (DistError, gloo) derive from it
        raise lost_peer(group, what, exc, own_error) from exc


def lost_peer(group: Group, what: str, exc: BaseException, own_error: BaseException | None = None) -> LoadError:
    """The LoadError of a rank whose peers stopped answering during ``what``."""
    dead = dead_ranks(group)
    cause = f"{type(exc).__name__}"
    if dead:
        cause = (f"rank {', '.join(map(str, dead))} of this host no longer running (killed, crashed "
                 f"or exited after an error); {cause}")
    got = f"{cause}: {str(exc)[:300]}"
    if own_error is not None:
        got += f" (this rank had failed first: {type(own_error).__name__}: {str(own_error)[:300]})"
    return LoadError(f"Lost contact with another rank during {what}",
                     where=f"seen by rank {group.rank} on host {group.node}", got=got,
                     fix=f"a rank was killed, ran out of memory or stalled for more than timeout="
                         f"{group.timeout:g} s; check the logs of the other ranks (dmesg for the OOM "
                         "killer), raise timeout= if storage is slow, and run the load again")


def dead_ranks(group: Group) -> list[int]:
    """Ranks on this machine whose process has exited (known from the pids exchanged at setup)."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(group.processes)
            if h == host and r != group.rank and not _running(pid)]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True


def _error_info(group: Group, error: BaseException) -> dict:
    msg = str(error) or ("interrupted (SIGINT)" if isinstance(error, KeyboardInterrupt) else "no message")
    return {"node": group.node, "type": type(error).__name__, "msg": msg, "secondary": _from_collective(error)}


def _from_collective(error: BaseException) -> bool:
    """True when ``error`` was raised inside torch.distributed (directly or as the cause of a
    LoadError): a consequence of another rank's failure, not a cause to report first."""
    marker = os.sep + os.path.join("torch", "distributed") + os.sep
    for exc in (error, error.__cause__):
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and marker in tb.tb_frame.f_code.co_filename:
            return True
    return False


def gather_facts(group: Group, facts: dict, error: BaseException | None = None) -> list[dict]:
    """Every rank's facts (host, local rank, device, memory), in rank order (collective).
    ``error``: this rank failed before planning; then every rank raises (see sync_status)."""
    mine = {"facts": facts, "error": None if error is None else _error_info(group, error)}
    blobs = all_gather_bytes(group, json.dumps(mine, sort_keys=True).encode(), "the exchange of rank facts")
    items = [json.loads(b) for b in blobs]
    _raise_failed(group, "plan", [item["error"] for item in items], error)
    return [item["facts"] for item in items]


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
    blob = broadcast_bytes(group, blob, what="the broadcast of the plan")
    if blob[:1] == b"E":
        raise pickle.loads(blob[1:])  # noqa: S301 - produced by rank 0 of this load
    return json.loads(blob[1:])


def sync_status(group: Group, phase: str, error: BaseException | None) -> None:
    """End of a phase: every rank reports ok or its error; if any rank failed, every rank
    raises a LoadError naming the first failing rank, its host and its cause (collective).
    A rank that cannot reach its peers raises a LoadError saying so (see :func:`guarded`)."""
    mine = b"" if error is None else json.dumps(_error_info(group, error)).encode()
    if group.world_size == 1:
        reports = [mine]
    else:
        reports = guarded(group, f"the {phase} phase", lambda: _all_gather_bytes(group, mine, group.pg), error)
    _raise_failed(group, phase, [json.loads(b) if b else None for b in reports], error)


def _raise_failed(group: Group, phase: str, infos: list[dict | None], error: BaseException | None) -> None:
    failed = [(r, info) for r, info in enumerate(infos) if info]
    if not failed:
        return
    causes = [(r, info) for r, info in failed if not info.get("secondary")] or failed
    rank, info = causes[0]
    others = f" (and ranks {[r for r, _ in causes[1:]]})" if len(causes) > 1 else ""
    err = LoadError(f"The load failed during {phase} on rank {rank}{others}",
                    where=f"rank {rank} on host {info['node']}",
                    got=f"{info['type']}: {info['msg']}",
                    fix="fix the cause on that rank and run the load again")
    raise err from error
