"""The ``node-shared`` transport: what a node's ranks need is held on the node once.

- Bytes the node reads itself stay in the node's page cache: the ranks populate their assigned
  ranges with large reads (:mod:`weightcast.workers.populate`), then every rank maps the files
  privately (copy-on-write).
- Bytes read on another node arrive over the plan's ring hops into one shared-memory area per
  node and file (:mod:`weightcast.workers.staging_areas`), written once by the receiving rank
  and mapped privately by the node's ranks.
After a barrier each rank's tensors are views of those mappings
(:mod:`weightcast.workers.staging_views`). A write by one rank never shows in another's
tensors. Areas are unlinked as soon as every rank has mapped them, by survivors after an error,
and stale ones of dead loads are reclaimed.

:func:`run_node_shared` is collective over the load's group.
"""
from __future__ import annotations

import time
from itertools import groupby
from typing import Any, Callable

import torch
import torch.distributed as dist

from weightcast.orchestrator.planner import LoadPlan
from weightcast.workers.collectives import barrier
from weightcast.workers.group import Group
from weightcast.workers.populate import Populate, populate_method
from weightcast.workers.progress import progress_bar
from weightcast.workers.reader import ReadPool, StorageReader
from weightcast.workers.staging_areas import Areas, FileMaps, StagedMaps, remove_areas
from weightcast.workers.staging_views import build_views, node_of
from weightcast.workers.transfer import TransferStats


def run_node_shared(group: Group, plan: LoadPlan, root: str, reader: StorageReader, load_id: str,
                    threads: int = 4, show_progress: bool = True) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Execute ``plan`` with node-shared staging; returns this rank's tensors (collective).
    A ``staged`` reader (object storage) reads into the node's ``/dev/shm`` areas with its own
    request size and concurrency; every view then maps those areas."""
    stats = TransferStats()
    node_names = [n for n, _ in plan.nodes]
    node_index = node_names.index(node_of(plan, group.rank))
    sizes = {f.name: f.size for f in plan.files}
    areas = Areas(load_id, node_index, sizes, {f.name: i for i, f in enumerate(plan.files)})
    staged = bool(getattr(reader, "staged", False))
    pool = ReadPool(reader, getattr(reader, "concurrency", threads) if staged else threads)
    maps: Any = StagedMaps(areas) if staged else FileMaps(root, plan)
    mine = sum(i.length for i in plan.reads if i.rank == group.rank)
    populate = None
    try:
        t0 = time.perf_counter()
        method = "staged" if staged else populate_method(root, reader)
        with progress_bar(mine if show_progress and group.rank == 0 else 0, "reading") as bar:
            populate = Populate(plan, group.rank, method, maps, pool, threads, bar)
            _run_hops(group, plan, maps, areas, stats, populate.wait)  # overlaps the reads
            t_hops = time.perf_counter()
            populate.finish()
        stats.read_bytes = mine if method == "madvise" else reader.bytes_read
        stats.staged_bytes += stats.read_bytes if staged else 0
        t1 = time.perf_counter()
        barrier(group)  # every node's page cache and staging areas are complete
        t2 = time.perf_counter()
        tensors = build_views(plan, group.rank, maps, areas, staged)
        barrier(group)  # every rank has mapped what it needs
        remove_areas(load_id)
        stats.events += [("read", t0, t1), ("transfer", t0, max(t_hops, t2)), ("views", t2, time.perf_counter())]
    finally:
        if populate is not None:
            populate.close()
        pool.close()
        areas.close()
    return tensors, stats


def _run_hops(group: Group, plan: LoadPlan, maps: FileMaps, areas: Areas, stats: TransferStats,
              ready: Callable[[str, int, int], None]) -> None:
    """Ring hops across nodes, round by round: a rank sends a chunk it read once ``ready`` says
    its bytes are in, and forwards one only after it arrived."""
    me = group.rank
    my_node = node_of(plan, me)
    for _, items in groupby(plan.transfers, key=lambda t: t.round):
        pending = []
        for t in items:
            if t.kind != "hop" or (t.src != me and me not in t.dsts):
                continue
            for cid in t.chunks:
                c = plan.chunks[cid]
                if t.src == me:
                    src_node_read = node_of(plan, c.reader) == my_node
                    if src_node_read:
                        ready(c.file, c.offset, c.length)
                    buf = (maps.get(c.file) if src_node_read
                           else areas.writable(c.file))[c.offset:c.offset + c.length]
                    pending.append(dist.isend(buf, t.dsts[0], group=group.data_pg))
                    stats.sent_bytes += c.length
                    stats.cross_node_sent += c.length
                else:
                    dest = areas.writable(c.file)[c.offset:c.offset + c.length]
                    pending.append(dist.irecv(dest, t.src, group=group.data_pg))
                    stats.recv_bytes += c.length
                    stats.cross_node_recv += c.length
                    stats.staged_bytes += c.length
        for w in pending:
            w.wait()
