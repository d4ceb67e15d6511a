"""Planner internals, second half: the transfer schedule.

Called only by :func:`weightcast.orchestrator.planner.plan_load` after the readers are chosen.

- ``collective``: each chunk goes from its reader to its other consumers; chunks with the same
  (kind, src, dsts) fill buckets of at most ``bucket_bytes`` (a scatter bucket always holds whole
  tensors). Round k holds every source's k-th bucket (in the order its last chunk is read, so a
  reader that reads in file order can send each bucket as soon as it is complete): the
  point-to-point items of one round come from different sources and may run concurrently, which
  is what spreads cross-node fan-out over every node's network link.
- ``node-shared``: a chunk read on node A and needed on other nodes travels one ring per rail
  (rail k = local rank k of each node): A -> B -> C ..., visiting only the nodes that need it, in
  cluster node order after A. Chunks fill buckets per stream (reader node, rail, route), each at
  most ``bucket_bytes`` (a quarter of the stream for a stream that fits one bucket); bucket ``b``
  of a stream makes hop ``s`` in round ``b + s``, a pipelined ring that starts as soon as each
  reader has read its bucket 0.
"""
from __future__ import annotations

from bisect import bisect_left

from weightcast.orchestrator.cluster import ClusterSpec
from weightcast.orchestrator.plan_build import Needs
from weightcast.orchestrator.plan_types import Chunk, PlanOptions, TransferItem

RING_DEPTH = 4  # a small ring stream is cut into this many buckets (when its chunks allow)


def make_transfers(chunks: tuple[Chunk, ...], cluster: ClusterSpec, options: PlanOptions,
                   needs: Needs) -> tuple[TransferItem, ...]:
    """The transfer items of a plan, in execution order."""
    if options.transport == "collective":
        return _collective(chunks, cluster.world_size, options.bucket_bytes, needs)
    if cluster.storage == "node-local":
        return ()  # every node read what it needs; nothing crosses nodes
    return _ring(chunks, cluster, options.bucket_bytes)


def _collective(chunks: tuple[Chunk, ...], world: int, bucket_bytes: int,
                needs: Needs) -> tuple[TransferItem, ...]:
    lengths = {s.tensor.name: s.stop - s.start for s in needs.segments if s.scatter}
    open_: dict[tuple, list] = {}  # key -> [chunk ids, bytes]
    closed: list[tuple[tuple, list[int]]] = []
    pending: dict[tuple[str, int], list] = {}  # scatter (tensor, reader) -> [ids, bytes]
    for c in chunks:
        i = bisect_left(c.consumers, c.reader)
        dsts = c.consumers[:i] + c.consumers[i + 1:]  # consumers are sorted; reader is one
        if not dsts:
            continue
        if c.tensor in lengths:
            part = pending.setdefault((c.tensor, c.reader), [[], 0])
            part[0].append(c.id)
            part[1] += c.length
            if part[1] < lengths[c.tensor]:
                continue
            del pending[(c.tensor, c.reader)]
            key, ids, size = ("scatter", c.reader, dsts), part[0], part[1]
        else:
            kind = "broadcast" if len(dsts) + 1 == world else "send"
            key, ids, size = (kind, c.reader, dsts), [c.id], c.length
        bucket = open_.get(key)
        if bucket is not None and bucket[1] + size > bucket_bytes:
            closed.append((key, bucket[0]))
            bucket = None
        if bucket is None:
            bucket = open_[key] = [[], 0]
        bucket[0].extend(ids)
        bucket[1] += size
    closed.extend((key, b[0]) for key, b in open_.items())
    closed.sort(key=lambda kb: kb[1][-1])  # by the id of the bucket's last chunk
    nth: dict[int, int] = {}
    timed = []
    for key, ids in closed:  # round k holds every source's k-th bucket
        k = nth.get(key[1], 0)
        nth[key[1]] = k + 1
        timed.append((k, ids[-1], key, ids))
    timed.sort(key=lambda x: x[:2])
    return tuple(TransferItem(kind, src, dsts, tuple(ids), i, 0, k)
                 for i, (k, _, (kind, src, dsts), ids) in enumerate(timed))


def rails(cluster: ClusterSpec) -> tuple[list[list[int]], list[int], list[int]]:
    """(ranks of each node sorted by local rank, node index of each rank, rail of each rank)."""
    names = cluster.nodes
    node_idx = {n: i for i, n in enumerate(names)}
    node_ranks: list[list[int]] = [[] for _ in names]
    for r in sorted(cluster.ranks, key=lambda r: (node_idx[r.node], r.local_rank, r.rank)):
        node_ranks[node_idx[r.node]].append(r.rank)
    rank_node = [node_idx[r.node] for r in cluster.ranks]
    rail = [0] * cluster.world_size
    for ranks in node_ranks:
        for k, r in enumerate(ranks):
            rail[r] = k
    return node_ranks, rank_node, rail


def ring_route(reader_node: int, need: set[int], n_nodes: int) -> tuple[int, ...]:
    """Nodes a chunk read on ``reader_node`` visits: those of ``need`` in ring order after it."""
    return tuple(x for x in ((reader_node + i) % n_nodes for i in range(1, n_nodes)) if x in need)


def _ring(chunks: tuple[Chunk, ...], cluster: ClusterSpec,
          bucket_bytes: int) -> tuple[TransferItem, ...]:
    node_ranks, rank_node, rail = rails(cluster)
    n_nodes = len(node_ranks)
    routes: dict[tuple[int, int], tuple[int, ...]] = {}
    keep = []  # keeps the consumer tuples alive while their id() keys the cache
    streams: dict[tuple[int, int, tuple[int, ...]], list] = {}
    for c in chunks:
        a = rank_node[c.reader]
        route = routes.get((id(c.consumers), a))
        if route is None:
            keep.append(c.consumers)
            route = ring_route(a, {rank_node[r] for r in c.consumers} - {a}, n_nodes)
            routes[(id(c.consumers), a)] = route
        if not route:
            continue
        streams.setdefault((a, rail[c.reader], route), []).append(c)
    streams = {key: _ring_buckets(members, bucket_bytes) for key, members in streams.items()}
    order = sorted((b, key) for key, buckets in streams.items() for b in range(len(buckets)))
    # bucket numbers rise along ``order`` and a bucket has one hop per round, so appending each
    # hop to its round's list keeps every list in (bucket, step) order: no sort needed
    by_round: dict[int, list[TransferItem]] = {}
    for number, (b, (a, k, route)) in enumerate(order):
        ids = tuple(streams[(a, k, route)][b][0])
        prev = a
        for s, node in enumerate(route):
            src = node_ranks[prev][k % len(node_ranks[prev])]
            dst = node_ranks[node][k % len(node_ranks[node])]
            by_round.setdefault(b + s, []).append(TransferItem("hop", src, (dst,), ids, number, s, b + s))
            prev = node
    return tuple(t for r in sorted(by_round) for t in by_round[r])


def _ring_buckets(members: list[Chunk], bucket_bytes: int) -> list[list]:
    """A stream's chunks in buckets of at most ``bucket_bytes``; a stream that fits one bucket is
    cut into RING_DEPTH buckets instead, so that even a small stream is pipelined (the workers
    send bucket 0 as soon as it is read, while the rest is read). Larger streams keep full
    buckets: they have two or more already, and more buckets mean more ring items to plan."""
    total = sum(c.length for c in members)
    limit = bucket_bytes if total > bucket_bytes else max(1, -(-total // RING_DEPTH))
    buckets: list[list] = []
    for c in members:
        if not buckets or buckets[-1][1] + c.length > limit:
            buckets.append([[], 0])
        buckets[-1][0].append(c.id)
        buckets[-1][1] += c.length
    return buckets
