"""Planner internals, first half: who owns what, which bytes are needed, chunks, readers, reads.

Called only by :func:`weightcast.orchestrator.planner.plan_load`, in this order: :func:`check_options`,
:func:`owned_and_needs`, :func:`make_chunks`, :func:`make_reads`. Pure and deterministic.
"""
from __future__ import annotations

import heapq
from bisect import bisect_left
from dataclasses import dataclass

from weightcast.orchestrator.checkpoint import CheckpointIndex, TensorEntry
from weightcast.orchestrator.cluster import ClusterSpec
from weightcast.orchestrator.device_map_types import ClusterDeviceMap, Place, Replicate, Shard, shard_bounds
from weightcast.orchestrator.errors import ConfigError, DeviceMapError, PlanError
from weightcast.orchestrator.plan_types import Chunk, OwnedRow, PlanOptions, ReadItem

TRANSPORTS = ("collective", "node-shared")
STORAGES = ("shared", "node-local")


@dataclass(frozen=True, slots=True)
class Segment:
    """A byte range ``[start, stop)`` of one tensor needed by ``consumers``. ``scatter``: the
    whole tensor of a dim > 0 shard, read once and cut into slices after it arrives."""
    tensor: TensorEntry
    start: int
    stop: int
    consumers: tuple[int, ...]
    scatter: bool = False


@dataclass(frozen=True, slots=True)
class Needs:
    segments: tuple[Segment, ...]  # in (file, offset) order, disjoint
    needed_bytes: int
    scatter: frozenset[str]  # tensors read whole and scattered


def check_options(options: PlanOptions, cluster: ClusterSpec) -> None:
    """Reject options and cluster facts the planner cannot honour, with the fix."""
    if options.transport not in TRANSPORTS:
        raise ConfigError("unknown transport", expected=" or ".join(TRANSPORTS),
                          got=repr(options.transport),
                          fix="resolve 'auto' to a transport before planning")
    for name in ("chunk_bytes", "bucket_bytes"):
        if getattr(options, name) < 1:
            raise ConfigError(f"PlanOptions.{name} must be positive", got=getattr(options, name))
    if options.gap_bytes < 0:
        raise ConfigError("PlanOptions.gap_bytes must be >= 0", got=options.gap_bytes)
    if cluster.storage not in STORAGES:
        raise ConfigError("unknown storage locality", where=f"cluster {cluster.name!r}",
                          expected=" or ".join(STORAGES), got=repr(cluster.storage))
    if not cluster.ranks or [r.rank for r in cluster.ranks] != list(range(cluster.world_size)):
        raise ConfigError("cluster ranks must be 0..N-1 in order", where=f"cluster {cluster.name!r}",
                          got=[r.rank for r in cluster.ranks][:16])


# ---------------------------------------------------------------- ownership and needs

def owned_and_needs(index: CheckpointIndex, cluster: ClusterSpec,
                    device_map: ClusterDeviceMap) -> tuple[list[OwnedRow], Needs]:
    """Expand every placement into owned rows and needed byte segments (file order)."""
    placements = device_map.placements
    _check_coverage(index, placements)
    ranks_of = _RankSets(cluster.world_size)
    rows: list[OwnedRow] = []
    segments: list[Segment] = []
    scatter: set[str] = set()
    for t in index.tensors:
        p = placements[t.name]
        if isinstance(p, Shard) and t.shape:
            _shard(t, p, ranks_of, rows, segments, scatter)
            continue
        if isinstance(p, Place):
            ranks, device = ranks_of.intern((_check_rank(p.rank, ranks_of.world, t.name),)), p.device
        elif isinstance(p, (Replicate, Shard)):
            ranks, device = ranks_of.members(p, t.name), None
        else:
            raise DeviceMapError("unknown placement", where=f"tensor {t.name!r}",
                                 expected="Replicate, Shard or Place", got=type(p).__name__)
        if not ranks:
            continue  # nobody owns it: nothing to read
        rows.append(OwnedRow(t.name, t.dtype, t.shape, None, 0, t.shape[0] if t.shape else 0,
                             device, ranks))
        if t.length:
            segments.append(Segment(t, 0, t.length, ranks))
    needed = sum(s.stop - s.start for s in segments)
    return rows, Needs(tuple(segments), needed, frozenset(scatter))


def _check_coverage(index: CheckpointIndex, placements: dict) -> None:
    missing = [n for n in index.names if n not in placements]
    extra = sorted(n for n in placements if n not in index)
    if missing:
        raise DeviceMapError(f"the device map does not place {len(missing)} tensor(s)",
                             got=", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
                             fix="add a placement (or a covering module prefix) for each")
    if extra:
        raise DeviceMapError(f"the device map places {len(extra)} tensor(s) not in the checkpoint",
                             got=", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""),
                             fix="build the device map from this checkpoint's index")


def _check_rank(rank: object, world: int, name: str) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world:
        raise DeviceMapError("placement names a rank outside the cluster", where=f"tensor {name!r}",
                             expected=f"a rank in 0..{world - 1}", got=repr(rank),
                             fix="plan with the cluster the device map was made for")
    return rank


class _RankSets:
    """Validated, interned rank tuples, computed once per distinct placement value (a model's
    tensors share a handful of placements, so validation is not repeated per tensor)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._intern: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._members: dict[tuple, tuple[int, ...]] = {}
        self._slices: dict[tuple, list[tuple[tuple[int, int], tuple[int, ...]]]] = {}
        self._intervals: dict[tuple, list[tuple[int, int, tuple[int, ...]]]] = {}

    def intern(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        return self._intern.setdefault(ranks, ranks)

    def members(self, p: Replicate | Shard, name: str) -> tuple[int, ...]:
        """Sorted distinct ranks of a Replicate, or of every group of a Shard."""
        key = (type(p), p.ranks if isinstance(p, Replicate) else p.groups)
        got = self._members.get(key)
        if got is None:
            if isinstance(p, Shard):
                self._validate_groups(p.groups, name)
            members = p.ranks if isinstance(p, Replicate) else [r for g in p.groups for r in g]
            got = self._members[key] = self.intern(
                tuple(sorted({_check_rank(r, self.world, name) for r in members})))
        return got

    def _validate_groups(self, groups: tuple[tuple[int, ...], ...], name: str) -> None:
        seen: set[int] = set()
        for group in groups:
            if not group:
                raise DeviceMapError("empty shard group", where=f"tensor {name!r}")
            for r in group:
                if _check_rank(r, self.world, name) in seen:
                    raise DeviceMapError("a rank appears twice in one shard placement",
                                         where=f"tensor {name!r}", got=r)
                seen.add(r)

    def slices(self, p: Shard, size: int, name: str) -> list[tuple[tuple[int, int], tuple]]:
        """[((start, stop), ranks)] of a Shard over ``size`` rows, sorted by bounds."""
        key = (p.groups, size)
        got = self._slices.get(key)
        if got is None:
            self.members(p, name)  # validates
            by: dict[tuple[int, int], list[int]] = {}
            for group in p.groups:
                for i, r in enumerate(group):
                    by.setdefault(shard_bounds(size, len(group), i), []).append(r)
            got = self._slices[key] = [(b, self.intern(tuple(sorted(rs))))
                                       for b, rs in sorted(by.items())]
        return got

    def intervals(self, p: Shard, size: int, name: str) -> list[tuple[int, int, tuple[int, ...]]]:
        """Disjoint row intervals of a dim-0 Shard over ``size`` rows with their consumers."""
        key = (p.groups, size)
        got = self._intervals.get(key)
        if got is None:
            got = self._intervals[key] = [(a, b, self.intern(r)) for a, b, r in
                                          _row_intervals(self.slices(p, size, name))]
        return got


def _shard(t: TensorEntry, p: Shard, ranks_of: _RankSets, rows: list[OwnedRow],
           segments: list[Segment], scatter: set[str]) -> None:
    """Rows and segments of a Shard placement of a tensor with at least one dimension."""
    ndim = len(t.shape)
    if not isinstance(p.dim, int) or not -ndim <= p.dim < ndim:
        raise DeviceMapError("shard dim out of range", where=f"tensor {t.name!r}",
                             expected=f"a dim in {-ndim}..{ndim - 1} for shape {list(t.shape)}",
                             got=p.dim)
    dim, size = p.dim % ndim, t.shape[p.dim % ndim]
    slices = ranks_of.slices(p, size, t.name)
    for (start, stop), ranks in slices:
        rows.append(OwnedRow(t.name, t.dtype, t.shape, dim, start, stop, None, ranks))
    if not t.length:
        return
    if dim != 0:
        segments.append(Segment(t, 0, t.length, ranks_of.members(p, t.name), True))
        scatter.add(t.name)
        return
    row = t.length // size
    if row * size != t.length:
        raise PlanError("tensor bytes are not a whole number of rows", where=f"tensor {t.name!r}",
                        expected=f"a multiple of {size} bytes", got=t.length,
                        fix="shard this tensor along another dim or replicate it")
    for start, stop, ranks in ranks_of.intervals(p, size, t.name):
        segments.append(Segment(t, start * row, stop * row, ranks))


def _row_intervals(slices: list[tuple[tuple[int, int], tuple[int, ...]]]
                   ) -> list[tuple[int, int, tuple[int, ...]]]:
    """Cut the row axis at every slice boundary: disjoint intervals, each with the ranks whose
    slice covers it (groups of different sizes give overlapping slices)."""
    bounds = sorted({b for (start, stop), _ in slices if start < stop for b in (start, stop)})
    cons: list[list[int]] = [[] for _ in bounds]
    for (start, stop), ranks in slices:
        if start < stop:
            for k in range(bisect_left(bounds, start), bisect_left(bounds, stop)):
                cons[k].extend(ranks)
    return [(bounds[k], bounds[k + 1], tuple(sorted(cons[k])))
            for k in range(len(bounds) - 1) if cons[k]]


# ---------------------------------------------------------------- chunks and readers

def make_chunks(index: CheckpointIndex, cluster: ClusterSpec, needs: Needs,
                options: PlanOptions) -> tuple[Chunk, ...]:
    """Split needed segments into chunks, copy them per node on node-local storage, and give
    each a reader: its only consumer, or the least-loaded consumer (largest units first)."""
    rank_node = _rank_nodes(cluster)
    per_node = cluster.storage == "node-local"
    copies: list[tuple[Segment, int, int, tuple[int, ...], int]] = []  # seg, start, stop, cons, unit
    units: list[list] = []  # [bytes, candidates]
    split_cache: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for seg in needs.segments:
        groups = _node_groups(seg.consumers, rank_node, split_cache) if per_node \
            else [(0, seg.consumers)]
        pieces = _split(seg.start, seg.stop, options.chunk_bytes)
        seg_units = {}
        if seg.scatter:
            for node, cons in groups:
                seg_units[node] = len(units)
                units.append([seg.stop - seg.start, cons])
        for start, stop in pieces:
            for node, cons in groups:
                unit = seg_units.get(node)
                if unit is None:
                    unit = len(units)
                    units.append([stop - start, cons])
                copies.append((seg, start, stop, cons, unit))
    node_first = options.transport == "node-shared" and not per_node
    readers = _assign_readers(units, rank_node, cluster.world_size, node_first)
    return tuple(Chunk(i, seg.tensor.name, seg.tensor.file, seg.tensor.offset + start,
                       stop - start, start, readers[unit], cons)
                 for i, (seg, start, stop, cons, unit) in enumerate(copies))


def _rank_nodes(cluster: ClusterSpec) -> list[int]:
    node_idx = {n: i for i, n in enumerate(cluster.nodes)}
    return [node_idx[r.node] for r in cluster.ranks]


def _node_groups(consumers: tuple[int, ...], rank_node: list[int],
                 cache: dict) -> list[tuple[int, tuple[int, ...]]]:
    """The consumers split by node: [(node index, its consumers)], in node order (cached)."""
    got = cache.get(consumers)
    if got is None:
        by: dict[int, list[int]] = {}
        for r in consumers:
            by.setdefault(rank_node[r], []).append(r)
        got = cache[consumers] = [(n, tuple(by[n])) for n in sorted(by)]
    return got


def _split(start: int, stop: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into the fewest near-equal pieces of at most ``chunk_bytes``."""
    total = stop - start
    n = -(-total // chunk_bytes)
    step = -(-total // n)
    return [(s, min(stop, s + step)) for s in range(start, stop, step)]


def _assign_readers(units: list[list], rank_node: list[int], world: int,
                    node_first: bool) -> list[int]:
    """Reader of each unit: fixed for one candidate; otherwise largest-first greedy on the
    least-loaded candidate (by node then rank when ``node_first``, else by rank then node).
    One lazily refreshed heap per distinct candidate set keeps it O(units log ranks)."""
    rank_load = [0] * world
    node_load = [0] * (max(rank_node) + 1 if rank_node else 0)
    readers = [-1] * len(units)
    free = []
    for u, (size, cands) in enumerate(units):
        if len(cands) == 1:
            readers[u] = cands[0]
            rank_load[cands[0]] += size
            node_load[rank_node[cands[0]]] += size
        else:
            free.append(u)
    free.sort(key=lambda u: (-units[u][0], u))

    def key(r: int) -> tuple[int, int, int]:
        if node_first:
            return (node_load[rank_node[r]], rank_load[r], r)
        return (rank_load[r], node_load[rank_node[r]], r)

    heaps: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
    for u in free:
        size, cands = units[u]
        heap = heaps.get(cands)
        if heap is None:
            heap = heaps[cands] = [key(r) for r in cands]
            heapq.heapify(heap)
        while True:  # loads only grow: a top entry equal to its rank's current key is the least
            top = heap[0]
            current = key(top[2])
            if current == top:
                break
            heapq.heapreplace(heap, current)
        r = top[2]
        readers[u] = r
        rank_load[r] += size
        node_load[rank_node[r]] += size
    return readers


# ---------------------------------------------------------------- reads

def make_reads(chunks: tuple[Chunk, ...], options: PlanOptions) -> tuple[ReadItem, ...]:
    """Each reader's chunks coalesced per file across gaps of at most ``gap_bytes`` (gap bytes
    are read and counted), sorted by (rank, file, offset)."""
    per_rank: dict[int, list[Chunk]] = {}
    for c in chunks:  # chunk ids are in (file, offset) order
        per_rank.setdefault(c.reader, []).append(c)
    gap = options.gap_bytes
    reads: list[ReadItem] = []
    for rank in sorted(per_rank):
        cur: list = []  # [file, offset, end, ids]
        for c in per_rank[rank]:
            if cur and c.file == cur[0] and 0 <= c.offset - cur[2] <= gap:
                cur[2] = c.offset + c.length
                cur[3].append(c.id)
                continue
            if cur:
                reads.append(ReadItem(rank, cur[0], cur[1], cur[2] - cur[1], tuple(cur[3])))
            cur = [c.file, c.offset, c.offset + c.length, [c.id]]
        if cur:
            reads.append(ReadItem(rank, cur[0], cur[1], cur[2] - cur[1], tuple(cur[3])))
    return tuple(reads)
