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

import contextlib
import ctypes
import fcntl
import functools
import glob
import mmap
import os
import time
from bisect import bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import groupby
from typing import Any, Callable

import torch
import torch.distributed as dist

from weightcast.orchestrator.planner import Chunk, LoadPlan
from weightcast.workers.coordinator import Group, barrier
from weightcast.workers.layout import OwnedLayout, local_shape, owned_by, torch_dtype, view_bytes_as
from weightcast.orchestrator.errors import StorageError
from weightcast.workers.reader import FileReader, ReadPool, StorageReader, check_stamp
from weightcast.workers.transfer import TransferStats

SHM_DIR = "/dev/shm"
PREFIX = "weightcast-"
POPULATE_BYTES = 8 << 20
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux >= 5.14
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "ramfs", "bcachefs"}
_LIBC = ctypes.CDLL(None, use_errno=True)
_MADVISE_OK: bool | None = None


PROGRESS_MIN_BYTES = 512 << 20


@contextlib.contextmanager
def progress_bar(total: int, what: str):
    """A tqdm bar in bytes (GB/s shown) when ``total`` is large enough to be worth one."""
    if total < PROGRESS_MIN_BYTES:
        yield _NoBar()
        return
    from tqdm import tqdm
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"weightcast {what}", leave=False) as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        pass


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


def _segments(plan: LoadPlan, rank: int, size: int) -> list[tuple[str, int, int]]:
    """This rank's read ranges cut into requests of at most ``size`` bytes, ordered by first
    use: the chunks this rank sends first on a cross-node ring come first (their round), the
    rest after, so the ring starts while the remaining reads go on."""
    firsts: dict[str, list[tuple[int, int, int]]] = {}
    for t in plan.transfers:
        if t.kind == "hop" and t.step == 0 and t.src == rank:
            for cid in t.chunks:
                c = plan.chunks[cid]
                firsts.setdefault(c.file, []).append((c.offset, c.offset + c.length, t.round))
    for spans in firsts.values():
        spans.sort()
    out = []
    for item in plan.reads:
        if item.rank != rank:
            continue
        for off in range(item.offset, item.offset + item.length, size):
            n = min(size, item.offset + item.length - off)
            first = min((r for _, _, r in _overlapping(firsts.get(item.file, []), off, off + n)),
                        default=float("inf"))
            out.append((first, len(out), item.file, off, n))
    return [(f, off, n) for _, _, f, off, n in sorted(out)]


def _overlapping(spans: list[tuple], lo: int, hi: int) -> list[tuple]:
    """The entries ``(start, end, ...)`` of ``spans`` (sorted by start, disjoint) that overlap
    ``[lo, hi)``; only the 64 entries starting last before ``hi`` are looked at (spans are
    chunks or read requests, a range overlaps a few of them)."""
    i = bisect_right(spans, hi - 1, key=lambda x: x[0])
    return [x for x in spans[max(0, i - 64):i] if x[1] > lo]


class _Populate:
    """This rank's reads into the page cache, running in the background in first-use order
    (:func:`_segments`): through its own private mapping (``MADV_POPULATE_READ``: the page cache
    filled with large reads and this rank's page tables ready for its views, no copy) on local
    filesystems, else large reads into a small scratch buffer whose contents are discarded (the
    way for network filesystems, where page-sized mmap faults crawl). :meth:`wait` blocks until a
    byte range is in; :meth:`finish` until everything is."""

    def __init__(self, plan: LoadPlan, rank: int, method: str, maps: "_FileMaps", pool: ReadPool,
                 threads: int, bar: Any) -> None:
        self.bar = bar  # a progress bar, advanced as each request completes
        self.spans: dict[str, list[tuple[int, int, Future]]] = {}
        self.futures: list[Future] = []
        self._executor = None
        if method == "madvise":
            self._executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="weightcast-populate")
            for file, off, n in _segments(plan, rank, POPULATE_BYTES * 4):
                self._add(file, off, n, self._executor.submit(populate_read, maps.get(file).data_ptr() + off, n))
        elif method == "staged":  # object storage: the bytes land in the node's shared areas
            for file, off, n in _segments(plan, rank, pool.reader.request_bytes):  # type: ignore[attr-defined]
                dest = memoryview(maps.get(file).numpy())[off:off + n]
                self._add(file, off, n, pool.run(functools.partial(pool.reader.read_into, file, off, dest)))
        else:
            scratch = [torch.empty(POPULATE_BYTES, dtype=torch.uint8).numpy() for _ in range(4)]
            for k, (file, off, n) in enumerate(_segments(plan, rank, POPULATE_BYTES)):
                dest = memoryview(scratch[k % len(scratch)])[:n]  # discarded: sharing is fine
                self._add(file, off, n, pool.run(functools.partial(pool.reader.read_into, file, off, dest)))
        for spans in self.spans.values():
            spans.sort(key=lambda x: x[0])

    def _add(self, file: str, off: int, n: int, future: Future) -> None:
        self.spans.setdefault(file, []).append((off, off + n, future))
        self.futures.append(future)
        future.add_done_callback(lambda f: f.cancelled() or f.exception() or self.bar.update(n))

    def wait(self, file: str, offset: int, length: int) -> None:
        for _, _, future in _overlapping(self.spans.get(file, []), offset, offset + length):
            future.result()

    def finish(self) -> None:
        for f in self.futures:
            f.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def populate_read(addr: int, length: int) -> int:
    """``madvise(MADV_POPULATE_READ)`` over [addr, addr + length), page-aligned outward;
    returns ``length``."""
    start = addr - addr % PAGE
    size = addr + length - start
    if _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), MADV_POPULATE_READ) != 0:
        err = ctypes.get_errno()
        raise StorageError("Reading a checkpoint file through its mapping failed",
                           where=f"{length} bytes at address {addr:#x}", got=os.strerror(err),
                           fix="check the storage; retry the load")
    return length


def populate_method(root: str, reader: StorageReader) -> str:
    """``"madvise"`` for the real reader on a local filesystem (measured fastest here, warm and
    cold), ``"read"`` otherwise (network filesystems, FUSE, injected readers, old kernels)."""
    if type(reader) is not FileReader or not _madvise_works():
        return "read"
    fstype = filesystem_type(os.path.realpath(root))
    return "madvise" if fstype in LOCAL_FILESYSTEMS else "read"


def filesystem_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                mount_point = left.split()[4]
                inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fstype = mount_point, right.split()[0]
    except OSError:
        pass
    return fstype


def _madvise_works() -> bool:
    global _MADVISE_OK
    if _MADVISE_OK is None:
        buf = mmap.mmap(-1, PAGE)
        view = ctypes.c_char.from_buffer(buf)
        _MADVISE_OK = _LIBC.madvise(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(PAGE),
                                    MADV_POPULATE_READ) == 0
        del view
        buf.close()
    return _MADVISE_OK


class _FileMaps:
    """This rank's private (copy-on-write) mappings of the checkpoint files, one per file,
    checked against the size and mtime the plan recorded (a changed file is an error, never a
    SIGBUS later)."""

    def __init__(self, root: str, plan: LoadPlan) -> None:
        self.root = root
        self.stamps = {s.name: s for s in plan.files}
        self.maps: dict[str, torch.Tensor] = {}

    def get(self, file: str) -> torch.Tensor:
        if file not in self.maps:
            path = os.path.join(self.root, file)
            stamp = self.stamps[file]
            check_stamp(path, os.stat(path), stamp)
            storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=stamp.size)
            self.maps[file] = torch.empty(0, dtype=torch.uint8).set_(storage)
        return self.maps[file]


class _StagedMaps:
    """Object storage (a reader marked ``staged``): there is no file to map; what the node reads
    itself lands in the same shared-memory areas as bytes from other nodes."""

    def __init__(self, areas: _Areas) -> None:
        self.areas = areas

    def get(self, file: str) -> torch.Tensor:
        return self.areas.writable(file)


def run_node_shared(group: Group, plan: LoadPlan, root: str, reader: StorageReader, load_id: str,
                    threads: int = 4, show_progress: bool = True) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Execute ``plan`` with node-shared staging; returns this rank's tensors (collective).
    A ``staged`` reader (object storage) reads into the node's ``/dev/shm`` areas with its own
    request size and concurrency; every view then maps those areas."""
    stats = TransferStats()
    node_names = [n for n, _ in plan.nodes]
    node_index = node_names.index(_node_of(plan, group.rank))
    sizes = {f.name: f.size for f in plan.files}
    areas = _Areas(load_id, node_index, sizes, {f.name: i for i, f in enumerate(plan.files)})
    staged = bool(getattr(reader, "staged", False))
    pool = ReadPool(reader, getattr(reader, "concurrency", threads) if staged else threads)
    maps: Any = _StagedMaps(areas) if staged else _FileMaps(root, plan)
    mine = sum(i.length for i in plan.reads if i.rank == group.rank)
    populate = None
    try:
        t0 = time.perf_counter()
        method = "staged" if staged else populate_method(root, reader)
        with progress_bar(mine if show_progress and group.rank == 0 else 0, "reading") as bar:
            populate = _Populate(plan, group.rank, method, maps, pool, threads, bar)
            _run_hops(group, plan, maps, areas, stats, populate.wait)  # overlaps the reads
            t_hops = time.perf_counter()
            populate.finish()
        stats.read_bytes = mine if method == "madvise" else reader.bytes_read
        stats.staged_bytes += stats.read_bytes if staged else 0
        t1 = time.perf_counter()
        barrier(group)  # every node's page cache and staging areas are complete
        t2 = time.perf_counter()
        tensors = _build_views(plan, group.rank, maps, areas, staged)
        barrier(group)  # every rank has mapped what it needs
        remove_areas(load_id)
        stats.events += [("read", t0, t1), ("transfer", t0, max(t_hops, t2)), ("views", t2, time.perf_counter())]
    finally:
        if populate is not None:
            populate.close()
        pool.close()
        areas.close()
    return tensors, stats


def _node_of(plan: LoadPlan, rank: int) -> str:
    for name, ranks in plan.nodes:
        if rank in ranks:
            return name
    raise KeyError(rank)


def _run_hops(group: Group, plan: LoadPlan, maps: _FileMaps, areas: _Areas, stats: TransferStats,
              ready: Callable[[str, int, int], None]) -> None:
    """Ring hops across nodes, round by round: a rank sends a chunk it read once ``ready`` says
    its bytes are in, and forwards one only after it arrived."""
    me = group.rank
    my_node = _node_of(plan, me)
    for _, items in groupby(plan.transfers, key=lambda t: t.round):
        pending = []
        for t in items:
            if t.kind != "hop" or (t.src != me and me not in t.dsts):
                continue
            for cid in t.chunks:
                c = plan.chunks[cid]
                if t.src == me:
                    src_node_read = _node_of(plan, c.reader) == my_node
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


def _build_views(plan: LoadPlan, rank: int, maps: Any, areas: _Areas,
                 staged: bool = False) -> dict[str, torch.Tensor]:
    my_node = _node_of(plan, rank)
    node_ranks = set(dict(plan.nodes)[my_node])
    layouts = owned_by(plan, rank)
    per_tensor: dict[str, list[Chunk]] = {}
    for c in plan.chunks:
        if c.tensor in layouts:
            per_tensor.setdefault(c.tensor, []).append(c)
    shm_maps: dict[str, torch.Tensor] = {}
    out = {}
    for name, lay in layouts.items():
        chunks = [c for c in per_tensor.get(name, []) if _overlaps(lay, c) and (set(c.consumers) & node_ranks)]
        out[name] = _tensor_for(lay, chunks, set() if staged else node_ranks, maps, shm_maps, areas)
    return out


def _overlaps(lay: OwnedLayout, c: Chunk) -> bool:
    return c.tensor_offset < lay.start + lay.length and lay.start < c.tensor_offset + c.length


def _tensor_for(lay: OwnedLayout, chunks: list[Chunk], node_ranks: set[int], maps: _FileMaps,
                shm_maps: dict, areas: _Areas) -> torch.Tensor:
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
            return maps.get(first.file)
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
