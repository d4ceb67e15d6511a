"""Per-rank timelines of a load: every storage read request and every send / receive, with
start, end and bytes, kept in the load report at a bounded size.

A :class:`Timeline` is filled by one rank's threads (read pool, ring sender and receiver) while
a transport runs; :meth:`Timeline.compact` then merges neighbouring events of one kind until at
most ``cap`` remain per kind, so a report stays small whatever the number of requests. Times are
seconds since the load started (the report's ``PhaseClock``). Not collective; thread-safe.
"""
from __future__ import annotations

import threading
import time

KINDS = ("read", "send", "recv")
CAP = 200  # events kept per kind in a report


class Timeline:
    """Events ``[start, end, bytes, count]`` per kind (``read`` / ``send`` / ``recv``)."""

    def __init__(self, t0: float | None = None) -> None:
        self.t0 = time.perf_counter() if t0 is None else t0
        self.events: dict[str, list[list[float]]] = {k: [] for k in KINDS}
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter()

    def add(self, kind: str, start: float, end: float, nbytes: int) -> None:
        """Record one event; ``start`` and ``end`` are ``time.perf_counter()`` values."""
        with self._lock:
            self.events[kind].append([start - self.t0, end - self.t0, int(nbytes), 1])

    def compact(self, since: float | None = None, cap: int = CAP) -> dict[str, list[list[float]]]:
        """The events, sorted by start, at most ``cap`` per kind (see :func:`merge`), in seconds
        since ``since`` (a ``time.perf_counter()`` value; default: this timeline's start)."""
        shift = 0.0 if since is None else self.t0 - since
        with self._lock:
            return {k: merge([[e[0] + shift, e[1] + shift, *e[2:]] for e in v], cap)
                    for k, v in self.events.items() if v}


def merge(events: list[list[float]], cap: int) -> list[list[float]]:
    """``events`` sorted by start; while more than ``cap`` remain, each pair of neighbours whose
    gap is among the smallest half is merged into one ``[first start, last end, bytes summed,
    count summed]`` (so busy stretches become one bar, idle gaps survive)."""
    out = sorted((list(e) for e in events), key=lambda e: e[0])
    while len(out) > cap:
        gaps = sorted(range(len(out) - 1), key=lambda i: out[i + 1][0] - out[i][1])
        take = set(gaps[:max(1, min(len(out) - cap, len(gaps) // 2))])
        merged: list[list[float]] = []
        i = 0
        while i < len(out):
            e = out[i]
            if i in take and i + 1 < len(out):
                nxt = out[i + 1]
                e = [e[0], max(e[1], nxt[1]), e[2] + nxt[2], e[3] + nxt[3]]
                i += 1
            merged.append(e)
            i += 1
        out = merged
    return [[round(e[0], 6), round(e[1], 6), int(e[2]), int(e[3])] for e in out]


def busy_seconds(events: list[list[float]]) -> float:
    """Seconds covered by at least one event (the union of their intervals)."""
    total, end = 0.0, float("-inf")
    for start, stop, *_ in sorted(events):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total
