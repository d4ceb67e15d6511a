"""Read leases on the checkpoint files a rank maps (Linux file leases, ``man 2 fcntl``, "Leases").

While a process holds a read lease on a file, another process's truncation (``truncate(2)``) or
open for writing (``open(path, "r+b")``) does not happen: the kernel starts a *lease break* and
the writer blocks until every lease on the file is released, or until
``/proc/sys/fs/lease-break-time`` seconds (45 by default) have passed since the break started,
when the kernel removes the leases itself; a non-blocking opener gets EAGAIN. While a break is
pending, ``F_GETLEASE`` on a lease holder's descriptor says ``F_UNLCK`` instead of ``F_RDLCK``.

So a node-shared rank takes a read lease on every file it maps for the whole load and polls
them (:meth:`FileLeases.poll`, a few microseconds per file) before each step that touches the
mapped pages: a pending break is a StorageError naming the file, and the leases are released
so the writer goes on. Pages touched within lease-break-time of a poll that passed cannot have
been truncated away. A rename-replace does not break a lease (the file mapped stays whole):
:class:`weightcast.workers.file_guard.FileGuard`'s identity checks catch that.

Where a lease cannot be taken (EACCES: not the file's owner and no CAP_LEASE; EAGAIN: the file
is open for writing; EINVAL: a file system that refuses leases, e.g. NFS) the
file is only guarded by those checks: recorded in :attr:`FileLeases.unleased`, logged at debug
level, never an error. A lease holds off the writers of its own host only (shared storage that
grants local leases does not stop another host's). On other systems than Linux nothing is
leased. Per rank, not collective.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import sys

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
_FIX = "do not modify, truncate or replace a checkpoint while it is loaded; run the load again"


class FileLeases:
    """The read leases one rank holds on the files it maps, ``name -> fd``; ``unleased`` is
    ``name -> why no lease`` (the files guarded by the identity checks only)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        self.unleased: dict[str, str] = {}

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

    def poll(self) -> None:
        """Raise StorageError naming the first file whose lease is being broken or was lost (a
        writer is waiting to truncate or write it), after releasing every lease so the writer
        goes on. Called by the holding rank before it touches mapped pages; not collective."""
        for name, fd in self.fds.items():
            try:
                state = fcntl.fcntl(fd, _F_GETLEASE)
            except OSError as exc:
                state, got = None, exc.strerror
            else:
                got = "its read lease is being broken (another process waits to truncate it or write to it)"
            if state != fcntl.F_RDLCK:
                path = self.paths[name]
                self.release()
                raise StorageError("A checkpoint file is being changed (opened for writing or truncated) "
                                   "during the load", where=path, expected="no writer until the load returned",
                                   got=got, fix=_FIX)

    def release(self) -> None:
        """Close every leased descriptor (a blocked writer goes on once no process holds a
        lease on its file). Idempotent; called on every path out of a load."""
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def _why(err: int | None) -> str:
    return {errno.EACCES: "not the file's owner and no CAP_LEASE",
            errno.EAGAIN: "the file is open for writing",
            errno.EINVAL: "the file system does not support leases"}.get(err or 0, "lease refused")
