"""Read leases on the checkpoint files a rank maps (Linux file leases, ``man 2 fcntl``, "Leases").

While a process holds a read lease on a file, another process's truncation (``truncate(2)``) or
open for writing (``open(path, "r+b")``) does not happen: the kernel starts a *lease break* and
the writer blocks until every lease on the file is released, or until
``/proc/sys/fs/lease-break-time`` seconds (45 by default) have passed since the break started,
when the kernel removes the leases itself; a non-blocking opener gets EAGAIN. While a break is
pending, ``F_GETLEASE`` on a lease holder's descriptor says ``F_UNLCK`` instead of ``F_RDLCK``.

So a node-shared rank takes a read lease on every file it maps for the whole load and polls
them (:meth:`FileLeases.poll`, under a microsecond per file) before each step that touches the
mapped pages: a pending break is a StorageError naming the file, and the leases are released
so the writer goes on. In between, a thread (:meth:`FileLeases.watch`) polls every
``WATCH_PERIOD`` seconds and, on a break, replaces the rank's mappings of the files by zero
pages before it releases the leases: a touch reads zeros instead of faulting, even in a step
longer than lease-break-time, and the next poll fails the load. A rename-replace does not
break a lease (the file mapped stays whole): :class:`weightcast.workers.file_guard.FileGuard`'s
identity checks catch that.

Where a lease cannot be taken (EACCES: not the file's owner and no CAP_LEASE; EAGAIN: the file
is open for writing; EINVAL: a file system that refuses leases, e.g. NFS) the
file is only guarded by those checks: recorded in :attr:`FileLeases.unleased`, logged at debug
level, never an error. A lease holds off the writers of its own host only (shared storage that
grants local leases does not stop another host's). On other systems than Linux nothing is
leased. Per rank, not collective.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import signal
import sys
import threading
from typing import Any

from weightcast.orchestrator.errors import StorageError

log = logging.getLogger("weightcast")

# Linux only (fcntl(2)); Python's fcntl module names them on Linux
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
# the signal a lease break would send before F_SETOWN 0 takes effect: SIGURG is ignored by
# default (SIGIO, the kernel's default, would end the process)
_BREAK_SIGNAL = getattr(signal, "SIGURG", 23)

ENABLED = sys.platform.startswith("linux")  # tests turn it off to show what the leases prevent
WATCH_PERIOD = 0.25  # seconds between two polls of the watching thread (0: no thread)
_MAP_FIXED = 0x10  # Linux mmap(2) flag, not in Python's mmap module
_FIX = "do not modify, truncate or replace a checkpoint while it is loaded; run the load again"


class FileLeases:
    """The read leases one rank holds on the files it maps, ``name -> fd``; ``unleased`` is
    ``name -> why no lease`` (the files guarded by the identity checks only)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        self.unleased: dict[str, str] = {}
        self.mapped: dict[str, list[Any]] = {}  # name -> this rank's mappings (storages), alive until release
        self.broken: tuple[str, str] | None = None  # (name, what) once the watching thread saw a break
        self._lock = threading.Lock()
        self._watch: _Watch | None = None

    def take(self, name: str, path: str) -> int | None:
        """Open ``path`` read-only and take a read lease on it; returns the descriptor, or None
        when no lease could be taken (the reason goes to :attr:`unleased`). Called by the rank
        that maps the file, before it maps it."""
        if not ENABLED:
            self.unleased[name] = "file leases are off"
            return None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:  # the caller's stat names a missing file
            self.unleased[name] = exc.strerror or str(exc)
            return None
        try:
            fcntl.fcntl(fd, _F_SETSIG, _BREAK_SIGNAL)
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
            fcntl.fcntl(fd, fcntl.F_SETOWN, 0)  # no signal at all when a break starts: we poll
        except OSError as exc:
            os.close(fd)
            self.unleased[name] = f"{exc.strerror} ({_why(exc.errno)})"
            log.debug("weightcast: no read lease on %s: %s; guarded by identity checks only", path,
                      self.unleased[name])
            return None
        self.fds[name], self.paths[name] = fd, path
        return fd

    def note_mapping(self, name: str, storage: Any) -> None:
        """Record a mapping of ``name`` this rank made (a ``torch.UntypedStorage`` from
        ``from_file``), before it touches it: the watching thread may replace its pages (after
        a break at once). The reference keeps the mapping (its address range) this storage's
        until :meth:`release`: no other memory can come to lie there meanwhile."""
        with self._lock:
            self.mapped.setdefault(name, []).append(storage)
            if self.broken is not None:
                _zero_pages(storage.data_ptr(), storage.nbytes())

    def poll(self) -> None:
        """Raise StorageError naming the first file whose lease is being broken or was lost (a
        writer is waiting to truncate or write it), after releasing every lease so the writer
        goes on. Called by the holding rank before it touches mapped pages; not collective."""
        with self._lock:
            found = self.broken or self._first_break()
            if found is not None:
                self._release()
        if found is not None:
            raise StorageError("A checkpoint file is being changed (opened for writing or truncated) during the "
                               "load", where=self.paths[found[0]], expected="no writer until the load returned",
                               got=found[1], fix=_FIX)

    def _first_break(self) -> tuple[str, str] | None:
        """(name, what) of the first held lease that is being broken or was lost, else None."""
        for name, fd in self.fds.items():
            try:
                if fcntl.fcntl(fd, _F_GETLEASE) == fcntl.F_RDLCK:
                    continue
            except OSError as exc:
                return name, exc.strerror or str(exc)
            return name, "its read lease is being broken (another process waits to truncate it or write to it)"
        return None

    def watch(self, period: float | None = None) -> None:
        """Start a thread that polls the leases every ``period`` seconds until :meth:`unwatch`:
        when a writer arrives it replaces this rank's mappings of that file by zero pages (a
        touch then reads zeros instead of faulting, even once the writer went on), records the
        break for the next :meth:`poll`, which fails the load, and releases the leases. So a
        step that touches mapped pages for longer than lease-break-time cannot fault either."""
        period = WATCH_PERIOD if period is None else period
        if self.fds and period > 0 and self._watch is None:
            self._watch = _Watch(self, period)

    def unwatch(self) -> None:
        """Stop the watching thread (before the last poll of a load: after it nothing may
        replace the pages of the tensors a load returns)."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()

    def neutralize(self) -> bool:
        """The watching thread's poll: on a break, zero pages over all this rank's mappings of
        the files (every lease is released, so no file is held any more), then record the break
        and release the leases; True once that happened."""
        with self._lock:
            found = None if self.broken else self._first_break()
            if found is None:
                return self.broken is not None
            for storages in self.mapped.values():
                for storage in storages:
                    _zero_pages(storage.data_ptr(), storage.nbytes())
            self.broken = (found[0], found[1] + "; this rank's mappings of the files were replaced by zero pages "
                           "and its leases released, so the writer could go on")
            self._release()
            return True

    def release(self) -> None:
        """Stop the watching thread and close every leased descriptor (a blocked writer goes on
        once no process holds a lease on its file). Idempotent; called on every path out of a load."""
        self.unwatch()
        with self._lock:
            self._release()

    def _release(self) -> None:
        fds, self.fds = self.fds, {}
        if self._watch is None:  # nothing replaces pages any more: the mappings may go
            self.mapped = {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


class _Watch:
    """The thread of :meth:`FileLeases.watch` (a daemon: it only polls and maps)."""

    def __init__(self, leases: FileLeases, period: float) -> None:
        self.leases, self.period = leases, period
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="weightcast-lease-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.period):
            if self.leases.neutralize():
                return

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not threading.current_thread():
            self.thread.join()


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def _zero_pages(address: int, nbytes: int) -> None:
    """Replace the pages of ``[address, address + nbytes)`` (a private file mapping) by private
    zero pages, atomically (``MAP_FIXED``): the tensors viewing it stay valid memory."""
    if nbytes <= 0:
        return
    start = address - address % mmap.PAGESIZE
    length = -(-(address + nbytes - start) // mmap.PAGESIZE) * mmap.PAGESIZE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
    got = _LIBC.mmap(start, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if got != start:
        log.warning("weightcast: could not replace the mapping at %#x: %s", start, os.strerror(ctypes.get_errno()))


def _why(err: int | None) -> str:
    return {errno.EACCES: "not the file's owner and no CAP_LEASE",
            errno.EAGAIN: "the file is open for writing",
            errno.EINVAL: "the file system does not support leases"}.get(err or 0, "lease refused")
