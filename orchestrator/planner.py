"""The load planner: (CheckpointIndex, ClusterSpec, ClusterDeviceMap) -> LoadPlan.

Pure and deterministic: module-level functions over frozen dataclasses, no I/O. The same inputs
give a byte-identical plan JSON. Rank 0 calls :func:`plan_load` and ships :func:`plan_to_json`'s
bytes to every rank, which decodes them with :func:`plan_from_json`; no rank plans twice.

Vocabulary
----------
- ``Owned``: what one rank ends up holding: a whole tensor or a ``torch.chunk``-style slice of it
  along ``dim`` (rows ``[start, stop)``), on ``device``. ``LoadPlan.owned`` is an
  :class:`OwnedTable`: a read-only sequence of ``Owned`` sorted by (rank, name), stored compactly
  (a replicated tensor is one row, not one object per rank); use :func:`owned_of` for one rank.
- ``Chunk``: the unit of reading and moving: a contiguous byte range of exactly one tensor
  (``tensor_offset`` is where it starts inside the tensor). Big tensors are split into chunks of at
  most ``PlanOptions.chunk_bytes``; a chunk is read from storage by exactly one ``reader`` (once per
  cluster on shared storage, once per node on node-local storage) and is needed by ``consumers``.
  On node-local storage a range needed on several nodes is one chunk per node (distinct ids, same
  bytes), whose ``consumers`` are that node's consumers.
- ``ReadItem``: one storage request of a rank: a coalesced byte range of one file covering one or
  more chunks (gap bytes between chunks may be read when coalescing; they are counted).
- ``TransferItem``: bytes moving between ranks, in buckets every rank orders identically:
  ``broadcast`` (src -> every other rank of the world), ``send`` (src -> each rank of ``dsts``,
  point to point), ``scatter`` (src holds the whole tensor of the chunks; each dst receives only
  its own slice; an item always holds every chunk of its tensors), ``hop`` (node-shared transport:
  one ring hop from ``src`` to ``dsts[0]`` on another node; ``step`` orders the hops of a chunk
  along its ring). Items are listed in execution order, ``round`` non-decreasing, ``bucket``
  numbering the collective buckets in that order; items of one round may run together (a
  source's buckets are in successive rounds; a chunk's hop ``s`` is always in a later round than
  its hop ``s - 1``).

Which transfers exist depends on ``PlanOptions.transport``:
- ``collective``: every consumer that is not the reader receives the chunk's bytes (or its slice).
- ``node-shared``: ranks of one node share the node's page cache and staging area, so only bytes
  a node needs and did not read itself cross nodes, as ``hop`` items along one ring per rail
  (rail k = local rank k of every node; the ring visits only nodes that need the chunk, in cluster
  node order starting after the reader's node).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from weightcast.orchestrator import plan_build, plan_codec, plan_transfers
from weightcast.orchestrator.plan_types import (Chunk, FileStamp, LoadPlan, Owned, OwnedRow, OwnedTable,  # noqa: F401
                                                PlanOptions, ReadItem, TransferItem, owned_table)

if TYPE_CHECKING:
    from weightcast.orchestrator.checkpoint import CheckpointIndex
    from weightcast.orchestrator.cluster import ClusterSpec
    from weightcast.orchestrator.device_map_types import ClusterDeviceMap


# ---------------------------------------------------------------- entry points

def plan_load(index: "CheckpointIndex", cluster: "ClusterSpec", device_map: "ClusterDeviceMap",
              options: PlanOptions = PlanOptions()) -> LoadPlan:
    """Plan a load. Called by rank 0 only (or by ``weightcast plan``); pure and deterministic.

    Raises :class:`~orchestrator.errors.DeviceMapError` when the map does not cover the
    checkpoint or names ranks outside the cluster, :class:`~orchestrator.errors.ConfigError` for
    bad options, :class:`~orchestrator.errors.PlanError` for a tensor that cannot be sliced.
    """
    plan_build.check_options(options, cluster)
    devices = tuple(r.device for r in cluster.ranks)
    owned, needs = plan_build.owned_and_needs(index, cluster, device_map)
    chunks = plan_build.make_chunks(index, cluster, needs, options)
    reads = plan_build.make_reads(chunks, options)
    transfers = plan_transfers.make_transfers(chunks, cluster, options, needs)
    by_node: dict[str, list[int]] = {}
    for r in cluster.ranks:
        by_node.setdefault(r.node, []).append(r.rank)
    nodes = tuple((n, tuple(by_node[n])) for n in cluster.nodes)
    return LoadPlan(
        world_size=cluster.world_size, nodes=nodes, storage=cluster.storage, options=options,
        files=tuple(FileStamp(f.name, f.size, f.mtime_ns, f.etag) for f in index.files),
        owned=OwnedTable(owned, devices), chunks=chunks, reads=reads, transfers=transfers,
        checkpoint_bytes=index.total_bytes, needed_bytes=needs.needed_bytes, devices=devices)


def plan_to_json(plan: LoadPlan) -> bytes:
    """Compact, deterministic JSON bytes of ``plan`` (rank 0 broadcasts them as one blob)."""
    return plan_codec.encode(plan)


def plan_from_json(data: bytes) -> LoadPlan:
    """Decode :func:`plan_to_json`'s bytes. Called by every rank on the broadcast blob."""
    return plan_codec.decode(data)


# ---------------------------------------------------------------- accounting helpers

def owned_of(plan: LoadPlan, rank: int) -> tuple[Owned, ...]:
    """What ``rank`` owns, sorted by name; fast for big clusters (no scan of every rank)."""
    return owned_table(plan).for_rank(rank)


def owned_bytes(o: Owned | OwnedRow, length: int) -> int:
    """Bytes of the slice described by ``o`` of a tensor of ``length`` bytes."""
    if o.dim is None or not o.shape:
        return length
    size = o.shape[o.dim]
    return length * (o.stop - o.start) // size if size else 0


def tensor_lengths(plan: LoadPlan) -> dict[str, int]:
    """Byte length of every tensor that has chunks (whole-tensor length for scatter tensors)."""
    out: dict[str, int] = {}
    for c in plan.chunks:
        out[c.tensor] = max(out.get(c.tensor, 0), c.tensor_offset + c.length)
    return out


def rank_read_bytes(plan: LoadPlan) -> list[int]:
    """Bytes each rank reads from storage (gap bytes included)."""
    out = [0] * plan.world_size
    for r in plan.reads:
        out[r.rank] += r.length
    return out


def rank_owned_bytes(plan: LoadPlan, lengths: dict[str, int] | None = None) -> list[int]:
    """Bytes each rank owns. ``lengths`` (tensor -> bytes) is needed for tensors with no chunk
    (only empty tensors, then 0) and defaults to what the chunks tell."""
    lengths = tensor_lengths(plan) if lengths is None else lengths
    per_set: dict[tuple[int, ...], int] = {}
    for row in owned_table(plan).rows:
        per_set[row.ranks] = per_set.get(row.ranks, 0) + owned_bytes(row, lengths.get(row.name, 0))
    out = [0] * plan.world_size
    for ranks, n in per_set.items():
        for r in ranks:
            out[r] += n
    return out


def rank_recv_bytes(plan: LoadPlan) -> list[int]:
    """Bytes each rank receives from other ranks (a scatter dst counts only its slice; a hop's
    receiver counts the whole chunk, which it stages for its node)."""
    out = [0] * plan.world_size
    sizes = [c.length for c in plan.chunks]
    slices = slice_bytes(plan) if any(t.kind == "scatter" for t in plan.transfers) else {}
    for t in plan.transfers:
        if t.kind == "scatter":  # an item holds every chunk of its tensors
            names = {plan.chunks[c].tensor for c in t.chunks}
            for d in t.dsts:
                out[d] += sum(slices.get((name, d), 0) for name in names)
            continue
        n = sum(sizes[c] for c in t.chunks)
        dsts = t.dsts if t.kind != "broadcast" else [r for r in range(plan.world_size) if r != t.src]
        for d in dsts:
            out[d] += n
    return out


def slice_bytes(plan: LoadPlan) -> dict[tuple[str, int], int]:
    """(tensor, rank) -> bytes of the slice that rank owns, for slices along dim > 0 (a scatter
    item holds whole tensors, so a destination receives exactly its slices)."""
    lengths = tensor_lengths(plan)
    out: dict[tuple[str, int], int] = {}
    for row in owned_table(plan).rows:
        if row.dim and row.shape:
            n = owned_bytes(row, lengths.get(row.name, 0))
            for r in row.ranks:
                out[(row.name, r)] = n
    return out


def node_cross_bytes(plan: LoadPlan) -> dict[str, tuple[int, int]]:
    """node -> (bytes sent to other nodes, bytes received from other nodes). Hops count as
    they are; collective items count one copy per destination node (what a hierarchical
    broadcast moves), sent by the source's node."""
    node_of = {r: n for n, ranks in plan.nodes for r in ranks}
    sent = {n: 0 for n, _ in plan.nodes}
    recv = dict(sent)
    sizes = [c.length for c in plan.chunks]
    for t in plan.transfers:
        n = sum(sizes[c] for c in t.chunks)
        dsts = t.dsts if t.kind != "broadcast" else range(plan.world_size)
        src_node = node_of[t.src]
        for node in sorted({node_of[d] for d in dsts} - {src_node}):
            sent[src_node] += n
            recv[node] += n
    return {n: (sent[n], recv[n]) for n, _ in plan.nodes}

