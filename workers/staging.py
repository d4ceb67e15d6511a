"""The ``node-shared`` transport: what a node's ranks need is held on the node once.

- Bytes the node reads itself stay in the node's page cache: the ranks populate their assigned
  ranges with large reads (:mod:`weightcast.workers.populate`), then every rank maps the files
  privately (copy-on-write).
- Bytes read on another node arrive over the plan's ring hops into one shared-memory area per
  node and file (:mod:`weightcast.workers.staging_areas`), written once by the receiving rank
  and mapped privately by the node's ranks. The ring (:mod:`weightcast.workers.ring`) is a
  dataflow overlapping the reads. A tensor whose bytes come partly from both places is put
  whole in the area: the node's readers copy their part there as they read
  (:mod:`weightcast.workers.mirror`).
After a barrier each rank's tensors are views of those mappings
(:mod:`weightcast.workers.staging_views`). A write by one rank never shows in another's
tensors. Areas are unlinked as soon as every rank has mapped them, by survivors after an error,
and stale ones of dead loads are reclaimed.

:func:`run_node_shared` is collective over the load's group.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch

from weightcast.orchestrator.planner import LoadPlan
from weightcast.workers.collectives import barrier
from weightcast.workers.group import Group
from weightcast.workers.mirror import mirror_spans
from weightcast.workers.populate import Populate, populate_method
from weightcast.workers.progress import progress_bar
from weightcast.workers.reader import ReadPool, StorageReader
from weightcast.workers.ring import run_ring
from weightcast.workers.staging_areas import Areas, FileMaps, StagedMaps, check_space, remove_areas
from weightcast.workers.staging_views import build_views, node_of
from weightcast.workers.transfer import TransferStats


def run_node_shared(group: Group, plan: LoadPlan, root: str, reader: StorageReader, load_id: str,
                    threads: int = 4, show_progress: bool = True,
                    before_views: Callable[[], None] | None = None,
                    on_map: Callable[[str, torch.UntypedStorage], None] | None = None
                    ) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Execute ``plan`` with node-shared staging; returns this rank's tensors (collective).
    A ``staged`` reader (object storage) reads into the node's ``/dev/shm`` areas with its own
    request size and concurrency; every view then maps those areas. ``before_views`` runs once the
    pages are in, before any is copied (a check that the files did not change); ``on_map(file,
    storage)`` learns of each file mapping as it is made."""
    stats = TransferStats()
    node_names = [n for n, _ in plan.nodes]
    node_index = node_names.index(node_of(plan, group.rank))
    sizes = {f.name: f.size for f in plan.files}
    check_space(plan, node_of(plan, group.rank), bool(getattr(reader, "staged", False)))
    areas = Areas(load_id, node_index, sizes, {f.name: i for i, f in enumerate(plan.files)})
    staged = bool(getattr(reader, "staged", False))
    pool = ReadPool(reader, getattr(reader, "concurrency", threads) if staged else threads)
    maps: Any = StagedMaps(areas) if staged else FileMaps(root, plan, on_map)
    mine = sum(i.length for i in plan.reads if i.rank == group.rank)
    populate = None
    try:
        t0 = time.perf_counter()
        method = "staged" if staged else populate_method(root, reader)
        mirror = {} if staged else mirror_spans(plan, group.rank, set(dict(plan.nodes)[node_of(plan, group.rank)]))
        for file in mirror:
            areas.writable(file)  # opened here, before the read threads copy into it
        with progress_bar(mine if show_progress and group.rank == 0 else 0, "reading") as bar:
            populate = Populate(plan, group.rank, method, maps, pool, threads, bar, stats.timeline,
                                mirror, areas.writable)
            run_ring(group, plan, lambda f, here: maps.get(f) if here else areas.writable(f),
                     areas.writable, populate.wait, functools.partial(node_of, plan), stats,
                     stats.timeline, getattr(reader, "live", None))  # overlaps the reads
            t_hops = time.perf_counter()
            populate.finish()
        stats.read_bytes = mine if method == "madvise" else reader.bytes_read
        stats.staged_bytes += stats.read_bytes if staged else 0
        t1 = time.perf_counter()
        barrier(group)  # every node's page cache and staging areas are complete
        t2 = time.perf_counter()
        if before_views is not None:
            before_views()
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
