"""The order in which the node-shared ring passes its pieces between two ranks.

Used by the workers (``workers/ring.py``, on both ends of every pair) and by the cost model
(``orchestrator/cost_ring.py``); pure. Every chunk of a ``hop`` item is cut into pieces of at
most :data:`PIECE_BYTES`; a pair passes its pieces sorted by :func:`due`.
"""
from __future__ import annotations

from collections import defaultdict

from weightcast.orchestrator.planner import LoadPlan

PIECE_BYTES = 4 << 20  # small: a piece waits for its last byte to be read before it moves on
Piece = tuple[int, str, int, int]  # (chunk id, file, offset, length)


def pieces_of(plan: LoadPlan, chunk_ids: tuple[int, ...], size: int = PIECE_BYTES) -> list[Piece]:
    """The pieces of a hop's chunks, in order (the same on sender and receiver)."""
    out = []
    for cid in chunk_ids:
        c = plan.chunks[cid]
        for off in range(c.offset, c.offset + c.length, size):
            out.append((cid, c.file, off, min(size, c.offset + c.length - off)))
    return out


def first_hop_bases(plan: LoadPlan) -> dict[int, int]:
    """Chunk id -> bytes its reader sends on the ring before it (step-0 hops in plan order: the
    order the reader reads them in, see ``workers.populate.segments``)."""
    sent: dict[int, int] = defaultdict(int)
    base = {}
    for t in plan.transfers:
        if t.kind == "hop" and t.step == 0:
            for cid in t.chunks:
                base[cid] = sent[t.src]
                sent[t.src] += plan.chunks[cid].length
    return base


def due(plan: LoadPlan, base: dict[int, int], step: int, piece: Piece) -> tuple:
    """When a piece is expected to be ready for hop ``step``, in bytes of its reader's reads (the
    readers read at about the same rate), one piece later per hop; ties broken the same way on
    every rank. Each pair of ranks passes its pieces in this order."""
    cid, _, off, n = piece
    c = plan.chunks[cid]
    return (base.get(cid, 0) + off - c.offset + n + step * PIECE_BYTES, step, cid, off)
