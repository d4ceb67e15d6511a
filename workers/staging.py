"""The ``node-shared`` transport: what a node's ranks need is held on the node once.

- Bytes the node reads itself stay in the node's page cache: the ranks populate their assigned
  ranges with large reads (MiB requests into a small scratch buffer, so storage never sees
  page-sized faults), then every rank maps the files privately (copy-on-write).
- Bytes read on another node arrive over the plan's ring hops into one shared-memory area per
  node and file (``/dev/shm``), written once by the receiving rank and mapped privately by the
  node's ranks.
After a barrier each rank's tensors are zero-copy views of those mappings where the layout
allows (whole tensors, dim-0 slices); dim>0 slices, misaligned tensors and tensors whose bytes
come partly from both places are one private copy of exactly what the rank owns. A write by one
rank never shows in another's tensors. Areas are unlinked as soon as every rank has mapped
them, by survivors after an error, and stale ones of dead loads are reclaimed (a shared
``flock`` marks an area in use; a dead process holds no lock).

:func:`run_node_shared` is collective over the load's group.
"""
from __future__ import annotations

import fcntl
import glob
import os
from itertools import groupby

import torch
import torch.distributed as dist

from orchestrator.planner import Chunk, LoadPlan
from workers.coordinator import Group, barrier
from workers.layout import OwnedLayout, local_shape, owned_by, torch_dtype, view_bytes_as
from workers.reader import ReadPool, StorageReader, check_stamp
from workers.transfer import TransferStats

SHM_DIR = "/dev/shm"
PREFIX = "weightcast-"
POPULATE_BYTES = 8 << 20


def shm_path(load_id: str, node_index: int, file_index: int) -> str:
    return os.path.join(SHM_DIR, f"{PREFIX}{load_id}-n{node_index}-f{file_index}")


def reclaim_stale(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink staging areas no live process holds (left by killed loads). Not collective."""
    removed = []
    for path in glob.glob(os.path.join(shm_dir, PREFIX + "*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # in use by a live load
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def remove_areas(load_id: str, shm_dir: str = SHM_DIR) -> None:
    """Unlink every staging area of one load (idempotent; survivors call it after an error)."""
    for path in glob.glob(os.path.join(shm_dir, f"{PREFIX}{load_id}-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


class _Areas:
    """This rank's open staging areas (shared mappings for writing, flock held)."""

    def __init__(self, load_id: str, node_index: int, sizes: dict[str, int], file_index: dict[str, int]) -> None:
        self.load_id, self.node_index = load_id, node_index
        self.sizes, self.file_index = sizes, file_index
        self.fds: dict[str, int] = {}
        self.maps: dict[str, torch.Tensor] = {}

    def path(self, file: str) -> str:
        return shm_path(self.load_id, self.node_index, self.file_index[file])

    def writable(self, file: str) -> torch.Tensor:
        if file not in self.maps:
            path = self.path(file)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_size < self.sizes[file]:
                os.ftruncate(fd, self.sizes[file])
            self.fds[file] = fd
            storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=self.sizes[file])
            self.maps[file] = torch.empty(0, dtype=torch.uint8).set_(storage)
        return self.maps[file]

    def hold(self, file: str) -> None:
        """Take the shared lock on an existing area before mapping it (so it is not reclaimed)."""
        if file not in self.fds:
            fd = os.open(self.path(file), os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self.fds[file] = fd

    def close(self) -> None:
        self.maps.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _populate(pool: ReadPool, plan: LoadPlan, rank: int) -> list:
    """Read this rank's ranges into the page cache in large requests (data discarded)."""
    futures = []
    scratch = [torch.empty(POPULATE_BYTES, dtype=torch.uint8).numpy() for _ in range(4)]
    k = 0
    for item in plan.reads:
        if item.rank != rank:
            continue
        for off in range(item.offset, item.offset + item.length, POPULATE_BYTES):
            n = min(POPULATE_BYTES, item.offset + item.length - off)
            buf = scratch[k % len(scratch)]
            k += 1
            futures.append(pool.submit(item.file, off, memoryview(buf)[:n]))
    return futures


def run_node_shared(group: Group, plan: LoadPlan, root: str, reader: StorageReader, load_id: str,
                    threads: int = 4) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Execute ``plan`` with node-shared staging; returns this rank's tensors (collective)."""
    stats = TransferStats()
    node_names = [n for n, _ in plan.nodes]
    node_index = node_names.index(_node_of(plan, group.rank))
    sizes = {f.name: f.size for f in plan.files}
    areas = _Areas(load_id, node_index, sizes, {f.name: i for i, f in enumerate(plan.files)})
    pool = ReadPool(reader, threads)
    try:
        futures = _populate(pool, plan, group.rank)
        for f in futures:
            f.result()
        stats.read_bytes = reader.bytes_read
        _run_hops(group, plan, root, areas, stats)
        barrier(group)  # every node's page cache and staging areas are complete
        tensors = _build_views(plan, group.rank, root, areas, node_index)
        barrier(group)  # every rank has mapped what it needs
        remove_areas(load_id)
    finally:
        pool.close()
        areas.close()
    return tensors, stats


def _node_of(plan: LoadPlan, rank: int) -> str:
    for name, ranks in plan.nodes:
        if rank in ranks:
            return name
    raise KeyError(rank)


def _run_hops(group: Group, plan: LoadPlan, root: str, areas: _Areas, stats: TransferStats) -> None:
    """Ring hops across nodes, round by round: a rank forwards a chunk only after it arrived."""
    me = group.rank
    my_node = _node_of(plan, me)
    file_maps: dict[str, torch.Tensor] = {}
    for _, items in groupby(plan.transfers, key=lambda t: t.round):
        pending = []
        for t in items:
            if t.kind != "hop" or (t.src != me and me not in t.dsts):
                continue
            for cid in t.chunks:
                c = plan.chunks[cid]
                if t.src == me:
                    src_node_read = _node_of(plan, c.reader) == my_node
                    buf = (_file_bytes(file_maps, root, c.file, plan) if src_node_read
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


def _file_bytes(cache: dict[str, torch.Tensor], root: str, file: str, plan: LoadPlan) -> torch.Tensor:
    """A private (copy-on-write) mapping of a checkpoint file as flat uint8, checked against the
    size and mtime the plan recorded (a changed file is an error, never a SIGBUS later)."""
    if file not in cache:
        path = os.path.join(root, file)
        stamp = next(s for s in plan.files if s.name == file)
        check_stamp(path, os.stat(path), stamp)
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=stamp.size)
        cache[file] = torch.empty(0, dtype=torch.uint8).set_(storage)
    return cache[file]


def _build_views(plan: LoadPlan, rank: int, root: str, areas: _Areas, node_index: int) -> dict[str, torch.Tensor]:
    my_node = _node_of(plan, rank)
    node_ranks = set(dict(plan.nodes)[my_node])
    layouts = owned_by(plan, rank)
    per_tensor: dict[str, list[Chunk]] = {}
    for c in plan.chunks:
        if c.tensor in layouts:
            per_tensor.setdefault(c.tensor, []).append(c)
    file_maps: dict[str, torch.Tensor] = {}
    shm_maps: dict[str, torch.Tensor] = {}
    out = {}
    for name, lay in layouts.items():
        chunks = [c for c in per_tensor.get(name, []) if _overlaps(lay, c) and (set(c.consumers) & node_ranks)]
        out[name] = _tensor_for(lay, chunks, plan, root, node_ranks, file_maps, shm_maps, areas)
    return out


def _overlaps(lay: OwnedLayout, c: Chunk) -> bool:
    return c.tensor_offset < lay.start + lay.length and lay.start < c.tensor_offset + c.length


def _tensor_for(lay: OwnedLayout, chunks: list[Chunk], plan: LoadPlan, root: str, node_ranks: set[int],
                file_maps: dict, shm_maps: dict, areas: _Areas) -> torch.Tensor:
    o = lay.owned
    shape = local_shape(o)
    if not chunks:
        return torch.empty(shape, dtype=torch_dtype(o.dtype))
    local = [c.reader in node_ranks for c in chunks]
    first = chunks[0]
    base = first.offset - first.tensor_offset  # absolute file offset of the tensor
    lo, hi = base + lay.start, base + lay.start + lay.length

    def source(is_local: bool) -> torch.Tensor:
        if is_local:
            return _file_bytes(file_maps, root, first.file, plan)
        if first.file not in shm_maps:
            areas.hold(first.file)
            storage = torch.UntypedStorage.from_file(areas.path(first.file), shared=False,
                                                     nbytes=areas.sizes[first.file])
            shm_maps[first.file] = torch.empty(0, dtype=torch.uint8).set_(storage)
        return shm_maps[first.file]

    if all(local) or not any(local):
        raw = source(all(local))[lo:hi]
    else:  # bytes partly in the page cache, partly staged: assemble one private copy
        raw = torch.empty(hi - lo, dtype=torch.uint8)
        for c, is_local in zip(chunks, local):
            a, b = max(lo, c.offset), min(hi, c.offset + c.length)
            raw[a - lo:b - lo] = source(is_local)[a:b]
    if lay.contiguous:
        return view_bytes_as(raw, o.dtype, shape)
    full = view_bytes_as(raw, o.dtype, o.shape)
    return full.narrow(o.dim, o.start, o.stop - o.start).contiguous()
