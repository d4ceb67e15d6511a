"""Checkpoint files that change under a load's mappings become a StorageError, never a SIGBUS.

The node-shared transport hands out tensors that are views of each rank's private mapping of
the checkpoint files. Touching a mapped page that a truncation removed kills the process with
SIGBUS, so every rank holds a read lease on every file it maps from the start of the transfer
until the load returned or failed (:mod:`weightcast.workers.file_lease`: a truncation or an
open for writing then waits; a thread of the rank that sees one waiting replaces the rank's
mappings by zero pages and lets the writer go on), and before the steps that touch those pages
(the private copies made while building views, checksums, materialize, and once more at its
end) every rank checks, for every file it maps:

- that the file at its path is still the one it mapped: same device, inode, size, mtime and
  ctime as when the transfer started (a rename-replace changes the inode; a rewrite, even one
  that restores size and mtime, changes the ctime), the size and mtime being the plan's and
  the inode and ctime those rank 0 saw while planning (shared storage);
- that every page of the tensors it holds is still backed (``MADV_POPULATE_READ`` over their
  memory: the kernel answers EFAULT where a touch would raise SIGBUS);
- that no lease is being broken (a writer waits) and the thread saw none: else the leases are
  released and the load fails.

On a file the rank could not lease (a file system without leases, a file open for writing,
not its owner) a change between these checks and the touch a few milliseconds later can still
fault; files changed after the load returned are the caller's (see README, "Failure
behaviour"). Not collective; each rank checks its own mappings.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Any, Iterable, Iterator

from weightcast.orchestrator.errors import StorageError
from weightcast.workers.file_lease import FileLeases

_LIBC = ctypes.CDLL(None, use_errno=True)
_MADV_POPULATE_READ = 22  # Linux >= 5.14
_PAGE = mmap.PAGESIZE
_FIX = "do not modify, truncate or replace a checkpoint while it is loaded; run the load again"


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileGuard:
    """The identities of the files one rank maps (``stamps``: the plan's FileStamps)."""

    def __init__(self, root: str, stamps: Iterable[Any], planned: dict[str, list[int]] | None = None) -> None:
        self.root = root
        self.stamps = {s.name: s for s in stamps}
        self.planned = planned or {}  # name -> [inode, ctime_ns] rank 0 saw while planning
        self.ids: dict[str, tuple[int, int, int, int, int]] = {}
        self.leases = FileLeases()

    def snapshot(self) -> None:
        """Take a read lease on each file, then record its identity (start of the transfer); a
        size or mtime other than the plan's is already a StorageError (the leases released)."""
        try:
            for name in self.stamps:
                self._lease_and_record(name)
        except BaseException:
            self.leases.release()
            raise
        self.leases.watch()

    def _lease_and_record(self, name: str) -> None:
        """Lease ``name`` first (a truncation from then on waits for the load), then stat it:
        the descriptor leased must be the file at the path, sized and dated as planned."""
        stamp, when = self.stamps[name], "between planning and reading"
        fd = self.leases.take(name, os.path.join(self.root, name))
        st = self._stat(name)
        if fd is not None and _identity(os.fstat(fd))[:2] != _identity(st)[:2]:
            raise self._changed(name, "the file leased a moment before", f"inode {st.st_ino}", when)
        if (st.st_size, st.st_mtime_ns) != (stamp.size, stamp.mtime_ns):
            raise self._changed(name, f"size {stamp.size}, mtime_ns {stamp.mtime_ns} (the plan's)",
                                f"size {st.st_size}, mtime_ns {st.st_mtime_ns}", when)
        seen = self.planned.get(name)
        if seen is not None and [st.st_ino, st.st_ctime_ns] != list(seen):
            raise self._changed(name, f"inode {seen[0]}, ctime_ns {seen[1]} (when planned)",
                                f"inode {st.st_ino}, ctime_ns {st.st_ctime_ns}", when)
        self.ids[name] = _identity(st)

    def release(self) -> None:
        """Release the read leases (end of the load, success or failure); idempotent."""
        self.leases.release()

    def note_mapping(self, name: str, storage: Any) -> None:
        """A mapping of checkpoint file ``name`` this rank just made (see FileLeases.watch)."""
        self.leases.note_mapping(name, storage)

    def finish(self) -> None:
        """The last check of a load: stop the watching thread, then :meth:`check` (after this
        nothing replaces the pages of the tensors the load returns)."""
        self.leases.unwatch()
        self.check()

    def check(self, tensors: dict | None = None) -> None:
        """Raise StorageError naming the first file that changed since :meth:`snapshot`, a
        tensor page no longer backed by its file, or a file a writer waits to change (the
        leases are then released). The lease poll comes last, nearest the touch it guards,
        unless the watching thread already saw a writer (then it says so first)."""
        if self.leases.broken is not None:
            self.leases.poll()
        for name, before in self.ids.items():
            now = _identity(self._stat(name))
            if now != before:
                fields = ("device", "inode", "size", "mtime_ns", "ctime_ns")
                what = [f"{f} {a} -> {b}" for f, a, b in zip(fields, before, now) if a != b]
                raise self._changed(name, "the file mapped at the start of the transfer", ", ".join(what),
                                    "during the load")
        if tensors:
            check_backed(tensors.values())
        self.leases.poll()

    def _stat(self, name: str) -> os.stat_result:
        try:
            return os.stat(os.path.join(self.root, name))
        except OSError as exc:
            raise StorageError("A checkpoint file disappeared during the load", where=os.path.join(self.root, name),
                               got=exc.strerror, fix=_FIX) from None

    def _changed(self, name: str, expected: str, got: str, when: str) -> StorageError:
        return StorageError(f"A checkpoint file changed {when}", where=os.path.join(self.root, name),
                            expected=expected, got=got, fix=_FIX)


def check_backed(tensors: Iterable[Any]) -> None:
    """``MADV_POPULATE_READ`` over the bytes of every CPU tensor (each span once): a page a
    touch would fault on (its file was truncated) is a StorageError naming the file."""
    for ptr, size in _spans(tensors):
        err = _populate(ptr, size)
        if err:
            if err in (errno.EINVAL, errno.ENOSYS):  # an old kernel: the stat checks are all there is
                return
            raise StorageError("A loaded tensor's pages are no longer backed by its checkpoint file",
                               where=_mapped_file(ptr) or f"memory at {ptr:#x}", got=os.strerror(err),
                               expected="every page of the file mapped at the start of the load", fix=_FIX)


def populate(tensors: Iterable[Any]) -> bool:
    """Fault in every page of the CPU tensors' bytes as reading them would, with
    ``MADV_POPULATE_READ``, so that a page no longer backed by its file (truncated) is skipped
    instead of raising SIGBUS. False where the kernel lacks it (the caller reads the pages).
    Per rank, not collective."""
    for ptr, size in _spans(tensors):
        if _populate(ptr, size) in (errno.EINVAL, errno.ENOSYS):
            return False
    return True


def _spans(tensors: Iterable[Any]) -> Iterator[tuple[int, int]]:
    """``(address, bytes)`` of each CPU tensor's own bytes, each span once (meta and empty
    tensors skipped): only its own bytes, as its storage may be a whole file's mapping, and
    populating the rest would read from storage what other nodes read (and stage) for this one."""
    seen: set[tuple[int, int]] = set()
    for t in tensors:
        if getattr(t, "device", None) is None or t.device.type != "cpu" or t.is_meta:
            continue
        span = (t.data_ptr(), _extent(t))
        if span[1] and span not in seen:
            seen.add(span)
            yield span


def _populate(ptr: int, size: int) -> int:
    """``MADV_POPULATE_READ`` over ``[ptr, ptr + size)`` (whole pages): 0, or the errno."""
    start = ptr - ptr % _PAGE
    if _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(ptr + size - start), _MADV_POPULATE_READ) != 0:
        return ctypes.get_errno()
    return 0


def _extent(t: Any) -> int:
    """Bytes from a tensor's first element to just past its last one (strides included)."""
    if t.numel() == 0:
        return 0
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _mapped_file(addr: int) -> str | None:
    """The file mapped at ``addr`` in this process (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi:
                    return parts[5].strip() if len(parts) == 6 else None
    except OSError:
        pass
    return None
