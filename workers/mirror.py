"""Tensors a node gets partly from its own reads and partly over the ring: the node's readers
also put their part into the node's shared-memory area while they read, so that such a tensor is
one view of the area after the transfer instead of a private copy assembled from two places.

Used by the node-shared transport (:mod:`weightcast.workers.staging`); pure, not collective.
"""
from __future__ import annotations

from bisect import bisect_right

from weightcast.orchestrator.planner import LoadPlan

Spans = dict[str, list[tuple[int, int]]]  # file -> sorted, disjoint [start, end) byte ranges


def mirror_spans(plan: LoadPlan, rank: int, node_ranks: set[int]) -> Spans:
    """File ranges of the chunks ``rank`` reads whose tensor the node also receives over the ring
    (a chunk of it is read on another node and consumed on this one)."""
    staged = {c.tensor for c in plan.chunks
              if c.reader not in node_ranks and any(r in node_ranks for r in c.consumers)}
    out: Spans = {}
    for c in plan.chunks:
        if c.reader == rank and c.tensor in staged:
            out.setdefault(c.file, []).append((c.offset, c.offset + c.length))
    for spans in out.values():
        spans.sort()
    return out


def cut(spans: list[tuple[int, int]], offset: int, length: int) -> list[tuple[int, int, bool]]:
    """``[offset, offset + length)`` cut at the edges of ``spans``:
    ``(start, end, inside a span)`` pieces in order, covering the range exactly."""
    out: list[tuple[int, int, bool]] = []
    pos, end = offset, offset + length
    i = max(0, bisect_right(spans, (pos, float("inf"))) - 1)
    while pos < end:
        while i < len(spans) and spans[i][1] <= pos:
            i += 1
        if i < len(spans) and spans[i][0] <= pos:
            stop = min(end, spans[i][1])
            out.append((pos, stop, True))
        else:
            stop = min(end, spans[i][0]) if i < len(spans) else end
            out.append((pos, stop, False))
        pos = stop
    return out
