"""The small control collectives of a load: one ``bytes`` blob broadcast or gathered, barriers.

Every function here is collective over the load's :class:`~weightcast.workers.group.Group`: all
ranks call it, in the same order. Payloads travel as one ``bytes`` blob in a uint8 tensor
(object collectives pickle nested objects and cost seconds for megabytes). A peer that died or
went silent past the timeout makes each of them raise a :class:`LoadError` (:func:`guarded`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from weightcast.orchestrator.errors import LoadError
from weightcast.workers.group import Group, dead_ranks


def broadcast_bytes(group: Group, blob: bytes | None, src: int = 0, what: str = "a collective step") -> bytes:
    """Broadcast one bytes blob from ``src``; every rank gets it (collective). A lost peer is a
    LoadError (see :func:`guarded`)."""
    if group.world_size == 1:
        assert blob is not None
        return blob
    return guarded(group, what, lambda: broadcast_on(group, blob, src, group.pg))


def broadcast_on(group: Group, blob: bytes | None, src: int, pg: Any) -> bytes:
    """:func:`broadcast_bytes` on process group ``pg``, unguarded (collective over ``pg``)."""
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
    return guarded(group, what, lambda: all_gather_on(group, blob, group.pg))


def all_gather_on(group: Group, blob: bytes, pg: Any) -> list[bytes]:
    """:func:`all_gather_bytes` on process group ``pg``, unguarded (collective over ``pg``)."""
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
        guarded(group, what, lambda: all_gather_on(group, b"", pg))


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
    """The LoadError of a rank whose peers stopped answering during ``what``: the liveness
    channel's verdict naming the dead or stuck rank when it has one (see :func:`liveness_verdict`),
    else what gloo reported."""
    verdict = liveness_verdict(group)
    if verdict is not None:
        return verdict
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


def liveness_verdict(group: Group) -> LoadError | None:
    """The load's liveness verdict (:mod:`weightcast.workers.liveness`): a dead or stuck rank,
    named. When there is none yet, wait a little (a death's verdict may trail gloo's error by
    milliseconds), or, when a peer is already quiet, until its silence would make it stuck
    (gloo's own timeout may fire first)."""
    live = group.liveness
    if live is None:
        return None
    if live.verdict is None:
        rank, quiet = live.quiet_peer()
        stuck_soon = rank >= 0 and quiet > max(group.timeout / 2, 3.0)
        live.wait_verdict(live.stuck_after - quiet + 1.0 if stuck_soon else 0.5)
    return live.verdict
