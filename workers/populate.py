"""Reading a rank's byte ranges into the node's page cache (or its staging areas).

:class:`Populate` runs this rank's reads in the background, in first-use order
(:func:`segments`), through ``madvise(MADV_POPULATE_READ)`` on its private mapping on local
filesystems, else with large reads into a small scratch buffer (network filesystems, where
page-sized mmap faults crawl), or, for object storage, straight into the node's shared areas.
Ranges of tensors the node also receives over the ring are read (or copied) into the node's
area too (:mod:`weightcast.workers.mirror`). Every request is recorded in the rank's timeline.
Per rank, not collective.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
from bisect import bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from weightcast.orchestrator.errors import StorageError
from weightcast.orchestrator.planner import LoadPlan
from weightcast.workers.mirror import Spans, cut
from weightcast.workers.reader import FileReader, ReadPool, StorageReader
from weightcast.workers.timeline import Timeline


POPULATE_BYTES = 8 << 20
READ_BYTES = 2 << 20  # requests into the scratch buffers (network filesystems, FUSE): with a few in
# flight, a ring piece is ready about (threads x READ_BYTES) / the node's storage rate after its
# bytes started arriving, so they are kept small; the kernel cuts FUSE reads at 1 MiB anyway
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux >= 5.14
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "ramfs", "bcachefs"}
_LIBC = ctypes.CDLL(None, use_errno=True)
_MADVISE_OK: bool | None = None


def segments(plan: LoadPlan, rank: int, size: int) -> list[tuple[str, int, int]]:
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


class Populate:
    """This rank's reads into the page cache, running in the background in first-use order
    (:func:`segments`): through its own private mapping (``MADV_POPULATE_READ``: the page cache
    filled with large reads and this rank's page tables ready for its views, no copy) on local
    filesystems, else large reads into a small scratch buffer whose contents are discarded (the
    way for network filesystems, where page-sized mmap faults crawl). :meth:`wait` blocks until a
    byte range is in; :meth:`finish` until everything is."""

    def __init__(self, plan: LoadPlan, rank: int, method: str, maps: Any, pool: ReadPool,
                 threads: int, bar: Any, timeline: Timeline | None = None,
                 mirror: Spans | None = None, area: Callable[[str], torch.Tensor] | None = None) -> None:
        self.bar = bar  # a progress bar, advanced as each request completes
        self.timeline = timeline or Timeline()  # every request, with start, end and bytes
        self.spans: dict[str, list[tuple[int, int, Future]]] = {}
        self.futures: list[Future] = []
        self._executor = None
        self.mirror, self.area = mirror or {}, area  # ranges also copied into the node's area
        if method == "madvise":
            check = getattr(pool.reader, "live", None)  # the load's liveness (a GuardedReader's)
            self._executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="weightcast-populate")
            for file, off, n in segments(plan, rank, POPULATE_BYTES * 4):
                job = functools.partial(self._populate, maps.get(file), file, off, n, check)
                self._add(file, off, n, self._executor.submit(self._timed(job, n)))
        elif method == "staged":  # object storage: the bytes land in the node's shared areas
            for file, off, n in segments(plan, rank, pool.reader.request_bytes):  # type: ignore[attr-defined]
                dest = memoryview(maps.get(file).numpy())[off:off + n]
                job = functools.partial(pool.reader.read_into, file, off, dest)
                self._add(file, off, n, pool.run(self._timed(job, n)))
        else:
            scratch = [torch.empty(READ_BYTES, dtype=torch.uint8).numpy() for _ in range(4)]
            for k, (file, off, n) in enumerate(segments(plan, rank, READ_BYTES)):
                for a, b, mirrored in cut(self.mirror.get(file, []), off, n):
                    dest = (memoryview(self.area(file).numpy())[a:b] if mirrored and self.area
                            else memoryview(scratch[k % len(scratch)])[:b - a])  # discarded: sharing is fine
                    job = functools.partial(pool.reader.read_into, file, a, dest)
                    self._add(file, a, b - a, pool.run(self._timed(job, b - a)))
        for spans in self.spans.values():
            spans.sort(key=lambda x: x[0])

    def _populate(self, mapping: torch.Tensor, file: str, off: int, n: int, live: Any) -> None:
        """Page cache filled through the mapping; mirrored ranges copied into the area."""
        populate_file(file, mapping.data_ptr() + off, off, n, live)
        if self.area is not None:
            for a, b, mirrored in cut(self.mirror.get(file, []), off, n):
                if mirrored:
                    self.area(file)[a:b].copy_(mapping[a:b])

    def _timed(self, job: Callable[[], Any], n: int) -> Callable[[], None]:
        """``job`` recorded in the timeline as one read of ``n`` bytes."""
        def run() -> None:
            start = self.timeline.now()
            job()
            self.timeline.add("read", start, self.timeline.now(), n)
        return run

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


def populate_file(file: str, addr: int, offset: int, length: int, live: Any = None) -> int:
    """:func:`populate_read` of ``length`` bytes at ``offset`` of ``file`` mapped at ``addr``;
    stops first if a peer was lost (``live``: the load's Liveness); errors name the file."""
    if live is not None:
        live.check()
    try:
        return populate_read(addr, length)
    except StorageError as exc:
        raise StorageError("Reading a checkpoint file through its mapping failed", where=f"file {file!r}, "
                           f"{length} bytes at offset {offset}", got=str(exc).split("Got: ", 1)[-1].split(".")[0],
                           fix="the file was truncated, replaced or unreadable during the load: check the "
                               "storage and run the load again") from None


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
    inner = getattr(reader, "inner", reader) if type(reader).__name__ == "GuardedReader" else reader
    if type(inner) is not FileReader or not _madvise_works():
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
