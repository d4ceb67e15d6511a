"""Cost model of the node-shared ring as the workers run it: a dataflow, not rounds.

Called by :func:`weightcast.orchestrator.cost.predict` for plans with ``hop`` items; pure.

The workers (``workers/ring.py``) cut every hop into pieces and pass each pair's pieces in the
order of :func:`weightcast.orchestrator.ring_order.due`; a rank posts its sends in that order,
each as soon as its bytes are in: read by the sender (reads run in the order the ring first
needs them, at the rank's share of storage, a few requests in flight) or received from
upstream. The model walks every piece in that order; a piece of ``n`` bytes is posted at

    post = max(the sender's previous post, bytes ready)

and ends at ``max(post, sender node's uplink free, receiver node's downlink free) + n / link``
(and no earlier than the receiving rank's first touch of the bytes allows). Node links are full
duplex and carry a node's rails one after another.
"""
from __future__ import annotations

from collections import defaultdict

from weightcast.orchestrator.cluster import GB, ClusterSpec
from weightcast.orchestrator.planner import LoadPlan
from weightcast.orchestrator.ring_order import PIECE_BYTES, due, first_hop_bases, pieces_of

MAX_PIECES = 200_000  # coarser pieces beyond this (a model of a very large load stays quick)
READ_LAG_BYTES = 3 * (2 << 20)  # a request completes after the ones in flight with it: the
# workers keep 4 requests of 2 MiB in flight (workers/populate.py), so a byte is in about three
# requests' worth of the rank's storage share after it started arriving


def ring_ends(plan: LoadPlan, cluster: ClusterSpec, read_s: list[float],
              node_of: dict[int, str]) -> list[float]:
    """Per rank: when its last hop (sent or received) ends, in seconds since the load started
    (0 for a rank without hops). ``read_s``: each rank's read finish time."""
    read_total = [0] * plan.world_size
    for item in plan.reads:
        read_total[item.rank] += item.length
    link, touch = cluster.inter_node_gbps * GB, cluster.first_touch_gbps * GB
    free: dict[tuple[str, object], float] = defaultdict(float)
    posted = [0.0] * plan.world_size
    arrived: dict[tuple[int, int], float] = {}
    base = first_hop_bases(plan)
    end = [0.0] * plan.world_size
    for key, src, dst, cid, off, n in _pieces(plan, base):
        if key[1] == 0:  # step 0: read by the sender
            rate = read_total[src] / read_s[src] if read_s[src] else float("inf")
            ready = min(read_s[src], (key[0] + READ_LAG_BYTES) / rate)
        else:
            ready = arrived.get((cid, off), 0.0)
        posted[src] = max(posted[src], ready)
        out, inn, tch = ("out", node_of[src]), ("in", node_of[dst]), ("touch", dst)
        finish = max(max(posted[src], free[out], free[inn]) + n / link, free[tch] + n / touch)
        free[out] = free[inn] = free[tch] = finish
        arrived[(cid, off)] = finish
        end[src], end[dst] = max(end[src], finish), max(end[dst], finish)
    return end


def _pieces(plan: LoadPlan, base: dict[int, int]) -> list[tuple]:
    """Every hop's pieces as ``(due key, src, dst, chunk, offset, bytes)``, in due order."""
    hop_bytes = sum(plan.chunks[c].length for t in plan.transfers if t.kind == "hop" for c in t.chunks)
    size = max(PIECE_BYTES, -(-hop_bytes // MAX_PIECES))
    out = []
    for t in plan.transfers:
        if t.kind == "hop":
            for piece in pieces_of(plan, t.chunks, size):
                out.append((due(plan, base, t.step, piece), t.src, t.dsts[0], piece[0], piece[2], piece[3]))
    out.sort()
    return out
