"""The node-shared transport's cross-node ring, run as a dataflow: each piece moves as soon as its
bytes are there, with no round that waits for the slowest rank.

The plan's ``hop`` items say what crosses between which ranks. Every chunk of a hop is cut into
pieces of at most :data:`PIECE_BYTES`, and each pair of ranks passes its pieces in the order
they are expected to be ready (:func:`due`: how far its reader has read by then, one piece later
per hop), computed identically on both sides from the plan, so they match in order (gloo
point-to-point, tag 0, first posted first matched):

- a rank posts every receive up front (into the node's shared-memory area, its final place), and
  one thread per upstream rank waits for them in order, marking each piece arrived;
- the calling thread posts the sends in that order, each once its bytes are in: read by this
  rank (the read that covers it has completed) or received (the piece arrived from upstream);
- one thread per downstream rank waits for the sends in order.

A piece at hop ``s`` only waits for hop ``s - 1`` of the same piece, which comes earlier in
every rank's order, so no rank waits on one that waits on it. Reads and the ring therefore
overlap at piece granularity: a node forwards what it received while it still reads, and sends what it read as
soon as each request completes. Every send and receive is recorded in the rank's timeline.
When the ring fails on a rank, :func:`release` ends the waits still pending there and joins the
helper threads before the error goes on.

:func:`run_ring` is collective over the ranks that have hops (every rank calls it).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from weightcast.orchestrator.planner import LoadPlan
from weightcast.orchestrator.ring_order import Piece, due, first_hop_bases, pieces_of
from weightcast.workers.group import Group
from weightcast.workers.timeline import Timeline
from weightcast.workers.transfer import TransferStats

POLL_S = 0.2  # how often a blocked sender checks whether a helper thread failed
KICK_MS = 1  # after a failure: the wait that makes gloo close the connection to a peer (see release)
RELEASE_S = 5.0  # after a failure: how long release() works at ending the helper threads


class _Arrivals:
    """Which received pieces are in; helper-thread failures, re-raised to the caller."""

    def __init__(self, live: Any = None) -> None:
        self.events: dict[tuple[int, int], threading.Event] = {}
        self.errors: list[BaseException] = []
        self.live = live  # the load's liveness: a lost peer ends the wait at once
        self.blocked: dict[int, Any] = {}  # helper thread id -> the work it waits for now
        self.stopped = False  # the ring failed on this rank: helpers wait for nothing more

    def event(self, cid: int, off: int) -> threading.Event:
        return self.events.setdefault((cid, off), threading.Event())

    def wait(self, cid: int, off: int) -> None:
        ev = self.event(cid, off)
        while not ev.wait(POLL_S):
            self.check()

    def check(self) -> None:
        if self.live is not None:
            self.live.check()
        if self.errors:
            raise self.errors[0]


def _waiter(works: "queue.SimpleQueue", kind: str, timeline: Timeline,
            arrivals: _Arrivals) -> threading.Thread:
    """A thread waiting for the works put in ``works`` (one peer, in posted order; None
    ends), recording each as an event from the later of its posting and the previous completion;
    a completed receive marks its piece arrived."""
    def run() -> None:
        last, me = 0.0, threading.get_ident()
        try:
            while (item := works.get()) is not None and not arrivals.stopped:
                work, posted, n, piece = item
                arrivals.blocked[me] = work
                try:
                    work.wait()
                except RuntimeError as exc:  # a peer failed or was lost: a consequence, not a cause
                    exc.from_collective = True
                    raise
                finally:
                    del arrivals.blocked[me]
                end = timeline.now()
                timeline.add(kind, max(posted, last), end, n)
                last = end
                if kind == "recv":
                    arrivals.event(piece[0], piece[2]).set()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            arrivals.errors.append(exc)
    # Not a daemon: a daemon thread woken in a gloo wait while the interpreter shuts down aborts
    # the process ("terminate called without an active exception", SIGABRT). After a failure
    # release() ends the waits; the interpreter would wait for any still blocked.
    thread = threading.Thread(target=run, name=f"weightcast-ring-{kind}", daemon=False)
    thread.start()
    return thread


def run_ring(group: Group, plan: LoadPlan, source: Callable[[str, bool], torch.Tensor],
             dest: Callable[[str], torch.Tensor], ready: Callable[[str, int, int], None],
             node_of: Callable[[int], str], stats: TransferStats, timeline: Timeline,
             live: Any = None) -> None:
    """Run this rank's ring hops (collective). ``source(file, read_here)`` is the bytes this rank
    sends from (its mapping of the file when its node read the chunk, else the node's area);
    ``dest(file)`` the area received bytes land in; ``ready(file, off, n)`` blocks until this
    rank's own read of that range completed."""
    me, my_node = group.rank, node_of(group.rank)
    sends, recvs = [], defaultdict(list)
    base = first_hop_bases(plan)
    for t in plan.transfers:
        if t.kind != "hop" or (t.src != me and me not in t.dsts):
            continue
        for piece in pieces_of(plan, t.chunks):
            key = due(plan, base, t.step, piece)
            if t.src == me:
                sends.append((key, t.dsts[0], node_of(plan.chunks[piece[0]].reader) == my_node, piece))
            else:
                recvs[t.src].append((key, piece))
    sends.sort()
    recvs = {src: [piece for _, piece in sorted(items)] for src, items in recvs.items()}
    arrivals = _Arrivals(live)
    threads: list[threading.Thread] = []
    try:
        threads += [_post_recvs(group, src, items, dest, stats, timeline, arrivals) for src, items in recvs.items()]
        _post_sends(group, sends, source, ready, stats, timeline, arrivals, threads)
        for thread in threads:
            while thread.is_alive():  # a lost peer or a failed wait ends this at once
                thread.join(POLL_S)
                arrivals.check()
        arrivals.check()
    except BaseException:
        release(arrivals, threads)
        raise


def release(arrivals: _Arrivals, threads: list[threading.Thread]) -> None:
    """After a failure on this rank: end the ring's waits still pending, so that no helper
    thread stays blocked in gloo (the load fails anyway; a thread woken while the interpreter
    shuts down would abort the process). Each blocked wait is waited on again here for
    :data:`KICK_MS`: gloo then times it out and closes the connection to that peer, which fails
    every operation pending on it, here and on the peer (whose own helpers end too)."""
    arrivals.stopped = True
    deadline = time.monotonic() + RELEASE_S
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        for work in list(arrivals.blocked.values()):
            try:
                work.wait(timedelta(milliseconds=KICK_MS))
            except RuntimeError:  # the expected timeout, or the connection was closed already
                pass
        for thread in threads:
            thread.join(0.01)


def _post_recvs(group: Group, src: int, items: list[Piece], dest: Callable[[str], torch.Tensor],
                stats: TransferStats, timeline: Timeline, arrivals: _Arrivals) -> threading.Thread:
    works: queue.SimpleQueue = queue.SimpleQueue()
    for piece in items:
        _, file, off, n = piece
        works.put((dist.irecv(dest(file)[off:off + n], src, group=group.data_pg), timeline.now(), n, piece))
        stats.recv_bytes += n
        stats.cross_node_recv += n
        stats.staged_bytes += n
    works.put(None)
    return _waiter(works, "recv", timeline, arrivals)


def _post_sends(group: Group, sends: list[tuple[tuple, int, bool, Piece]],
                source: Callable[[str, bool], torch.Tensor], ready: Callable[[str, int, int], None],
                stats: TransferStats, timeline: Timeline, arrivals: _Arrivals,
                threads: list[threading.Thread]) -> None:
    """Post every send in plan order once its bytes are in; the per-destination waiters are
    appended to ``threads``."""
    queues: dict[int, queue.SimpleQueue] = {}
    try:
        for _, dst, read_here, piece in sends:
            cid, file, off, n = piece
            if read_here:
                ready(file, off, n)
            else:
                arrivals.wait(cid, off)
            arrivals.check()
            work = dist.isend(source(file, read_here)[off:off + n], dst, group=group.data_pg)
            if dst not in queues:
                queues[dst] = queue.SimpleQueue()
                threads.append(_waiter(queues[dst], "send", timeline, arrivals))
            queues[dst].put((work, timeline.now(), n, piece))
            stats.sent_bytes += n
            stats.cross_node_sent += n
    finally:
        for works in queues.values():
            works.put(None)
