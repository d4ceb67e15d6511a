"""The coordination round and the status exchanges every load uses (fail together).

Every function here is collective over the load's :class:`~weightcast.workers.group.Group`: all
ranks call it, in the same order. A failure on rank 0 while planning is broadcast instead of
the plan, so every rank raises the same error (:func:`coordinate`); failures on any rank inside
a phase are exchanged by :func:`sync_status`, so every rank raises the failing rank's
WeightcastError class (made a LoadError too, carrying that rank, its host and the phase), or a
LoadError naming the rank, its host and the cause for any other exception. A failing rank first drops the phase group
(:func:`weightcast.workers.process_group.abort_phase`) so peers blocked on it inside the phase
fail at once. A peer that died or went silent past the timeout makes every collective here
raise a LoadError too (:func:`weightcast.workers.collectives.guarded`).
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import traceback
from typing import Any, Callable

from weightcast.orchestrator.errors import LoadError, WeightcastError, peer_error
from weightcast.workers.collectives import (all_gather_bytes, all_gather_on, broadcast_bytes, guarded,
                                            liveness_verdict)
from weightcast.workers.group import Group


def _error_info(group: Group, error: BaseException) -> dict:
    """What a failing rank tells its peers: host, class, message, whether it is a consequence
    of another rank's failure, and a WeightcastError itself (pickled, base64) so every rank can
    raise its class."""
    msg = str(error) or ("interrupted (SIGINT)" if isinstance(error, KeyboardInterrupt) else "no message")
    info = {"node": group.node, "type": type(error).__name__, "msg": msg, "secondary": _from_collective(error)}
    if isinstance(error, WeightcastError) and not isinstance(error, LoadError):
        try:
            info["error"] = base64.b64encode(pickle.dumps(error)).decode()
        except Exception:  # noqa: BLE001 - the class name and message still travel
            pass
    return info


def _from_collective(error: BaseException) -> bool:
    """True when ``error`` was raised inside torch.distributed (directly or as the cause of a
    LoadError): a consequence of another rank's failure, not a cause to report first."""
    marker = os.sep + os.path.join("torch", "distributed") + os.sep
    for exc in (error, error.__cause__):
        if getattr(exc, "from_collective", False):  # marked where a wait on gloo failed (workers.ring)
            return True
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
    """Rank 0's planning error as broadcast: a WeightcastError itself (with its rank, host and
    phase set), anything else as a LoadError naming it."""
    if isinstance(exc, WeightcastError):
        if exc.rank is None:
            exc.rank, exc.host, exc.phase = group.rank, group.node, "plan"
        try:
            return b"E" + pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - fall back to a LoadError carrying the message
            pass
    cause = f"{type(exc).__name__}: {exc}"
    err = LoadError("Planning the load failed", where=f"rank {group.rank} on host {group.node}",
                    rank=group.rank, host=group.node, phase="plan", cause=type(exc).__name__,
                    got=cause, fix="see the cause; the traceback is in the log of that rank")
    return b"E" + pickle.dumps(err)


def coordinate(group: Group, plan_fn: Callable[[], bytes]) -> bytes:
    """Rank 0 runs ``plan_fn`` (the prepare step, returning the encoded order) and broadcasts
    its bytes or its exception; every rank returns the same bytes or raises the same error."""
    blob = None
    if group.rank == 0:
        try:
            blob = b"P" + plan_fn()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach every rank
            if isinstance(exc, KeyboardInterrupt) and group.world_size == 1:
                raise
            traceback.print_exc() if not isinstance(exc, WeightcastError) else None
            blob = _encode_error(exc, group)
    blob = broadcast_bytes(group, blob, what="the broadcast of the plan")
    if blob[:1] == b"E":
        raise pickle.loads(blob[1:])  # noqa: S301 - produced by rank 0 of this load
    return blob[1:]


def run_step(group: Group, phase: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on this rank, then :func:`sync_status`: every rank returns ``fn``'s result or
    every rank raises the first failing rank's error (collective). Ctrl-C of a lone rank is
    re-raised as it is."""
    result, error = None, None
    try:
        result = fn()
    except BaseException as exc:  # noqa: BLE001 - reported to every rank by sync_status
        if isinstance(exc, KeyboardInterrupt) and group.world_size == 1:
            raise
        error = exc
    sync_status(group, phase, error)
    return result


def sync_status(group: Group, phase: str, error: BaseException | None) -> None:
    """End of a phase: every rank reports ok or its error; if any rank failed, every rank
    raises the first failing rank's error (see :func:`_raise_failed`) (collective).
    A rank that cannot reach its peers raises a LoadError saying so (see :func:`guarded`)."""
    if error is not None and _from_collective(error):
        verdict = liveness_verdict(group)
        if verdict is not None:  # a peer died or is stuck: every survivor has the same verdict
            raise verdict from error
    mine = b"" if error is None else json.dumps(_error_info(group, error)).encode()
    if group.world_size == 1:
        reports = [mine]
    else:
        reports = guarded(group, f"the {phase} phase", lambda: all_gather_on(group, mine, group.pg), error)
    _raise_failed(group, phase, [json.loads(b) if b else None for b in reports], error)


def _raise_failed(group: Group, phase: str, infos: list[dict | None], error: BaseException | None) -> None:
    """Raise on this rank what the first failing rank (causes before consequences) raised: its
    WeightcastError's class (:func:`~weightcast.orchestrator.errors.peer_error`), else a
    LoadError naming the rank, its host and the cause; ``error`` (this rank's own) chained."""
    failed = [(r, info) for r, info in enumerate(infos) if info]
    if not failed:
        return
    causes = [(r, info) for r, info in failed if not info.get("secondary")] or failed
    rank, info = causes[0]
    others = f" (and ranks {[r for r, _ in causes[1:]]})" if len(causes) > 1 else ""
    if info.get("error"):  # a WeightcastError: every rank raises its class, also a LoadError
        original = pickle.loads(base64.b64decode(info["error"]))  # noqa: S301 - from a rank of this load
        raise peer_error(original, rank=rank, host=info["node"], phase=phase, others=others) from error
    err = LoadError(f"The load failed during {phase} on rank {rank}{others}",
                    where=f"rank {rank} on host {info['node']}",
                    got=f"{info['type']}: {info['msg']}",
                    fix="fix the cause on that rank and run the load again",
                    rank=rank, host=info["node"], phase=phase, cause=info["type"])
    raise err from error
