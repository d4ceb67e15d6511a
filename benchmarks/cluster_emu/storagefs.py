"""The emulated shared storage: a read-only FUSE passthrough with per-client byte counters and
an aggregate bandwidth cap.

Run as its own process by :mod:`benchmarks.cluster_emu.storage` (``python -m
benchmarks.cluster_emu.storagefs SRC MNT --rate-mbps R``); it serves ``SRC`` under ``MNT`` until
SIGTERM (libfuse then unmounts). Layout of the mount:

- ``MNT/<view>/...`` one view of ``SRC`` per emulated node (distinct paths, hence distinct
  inodes, hence one kernel page cache per node: the node's ranks share it as on a real node,
  other nodes do not see it, and every byte a node reads reaches this daemon);
- ``MNT/.emu-stats.json`` the counters, as JSON, a fresh snapshot at each open.

Every read is charged to a token bucket of ``rate`` bytes/s shared by every client (the
storage's aggregate bandwidth) and counted per client. A client is the network namespace of the
calling process (``/proc/<pid>/ns/net`` matched against ``/run/netns/*``): the emulated node.
With ``--direct-io`` files are opened with FUSE's ``direct_io`` (no client page cache at all;
shared mmap then fails with ENODEV).
"""
from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field

from benchmarks.cluster_emu.throttle import TokenBucket
from benchmarks.cluster_emu.topology import STATS_NAME

STATS_FH_BASE = 1 << 40


@dataclass
class Counters:
    """Bytes served, per client (network namespace name) and per view; guarded by ``lock``."""
    rate: float
    total_bytes: int = 0
    requests: int = 0
    max_request: int = 0
    throttled_s: float = 0.0
    clients: dict[str, int] = field(default_factory=dict)
    views: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, client: str, view: str, n: int, slept: float) -> None:
        with self.lock:
            self.total_bytes += n
            self.requests += 1
            self.max_request = max(self.max_request, n)
            self.throttled_s += slept
            self.clients[client] = self.clients.get(client, 0) + n
            self.views[view] = self.views.get(view, 0) + n

    def snapshot(self) -> bytes:
        with self.lock:
            data = {"total_bytes": self.total_bytes, "requests": self.requests,
                    "max_request": self.max_request, "throttled_s": round(self.throttled_s, 6),
                    "rate_bytes_per_s": self.rate, "clients": dict(self.clients),
                    "views": dict(self.views), "time": time.time(), "pid": os.getpid(),
                    "cpu_s": time.process_time()}
        return (json.dumps(data, sort_keys=True) + "\n").encode()


class NetnsNames:
    """Network namespace inode -> name under /run/netns (re-scanned on an unknown inode)."""

    def __init__(self, run_dir: str = "/run/netns") -> None:
        self.run_dir = run_dir
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()
        self._scanned = 0.0

    def client_of(self, pid: int) -> str:
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")  # "net:[4026532...]"
        except OSError:
            return "unknown"
        ino = link[5:-1]
        name = self._names.get(ino)
        if name is None:
            with self._lock:
                if time.monotonic() - self._scanned > 0.5:
                    self._rescan()
                name = self._names.get(ino, "host")
        return name

    def _rescan(self) -> None:
        self._scanned = time.monotonic()
        try:
            entries = os.listdir(self.run_dir)
        except OSError:
            return
        for name in entries:
            try:
                self._names[str(os.stat(os.path.join(self.run_dir, name)).st_ino)] = name
            except OSError:
                continue


def _operations_base():
    import mfusepy
    return mfusepy.Operations


class StorageFS(_operations_base()):
    """Read-only passthrough of ``src`` under one directory per view (see the module docstring).
    Called by libfuse's worker threads."""

    use_ns = True

    def __init__(self, src: str, views: list[str], rate: float, direct_io: bool) -> None:
        self.src = os.path.abspath(src)
        self.views = set(views)
        self.direct_io = direct_io
        self.bucket = TokenBucket(rate)
        self.counters = Counters(rate=rate)
        self.netns = NetnsNames()
        self._stats: dict[int, bytes] = {}
        self._stats_ids = itertools.count(STATS_FH_BASE)
        self._fh_view: dict[int, str] = {}

    # ---------------------------------------------------------------- paths
    def _split(self, path: str) -> tuple[str | None, str | None]:
        """'/view/rel' -> (view, real path in src); '/' -> (None, None)."""
        parts = path.strip("/").split("/", 1)
        if not parts[0]:
            return None, None
        view = parts[0]
        if view not in self.views:
            raise _fuse_error(errno.ENOENT)
        rel = parts[1] if len(parts) > 1 else ""
        real = os.path.normpath(os.path.join(self.src, rel))
        if real != self.src and not real.startswith(self.src + os.sep):
            raise _fuse_error(errno.ENOENT)
        return view, real

    def getattr(self, path: str, fh=None) -> dict:
        if path == "/":
            return _dir_attrs(os.stat(self.src))
        if path == "/" + STATS_NAME:
            now = time.time_ns()
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": 0,
                    "st_mtime": now, "st_atime": now, "st_ctime": now}
        _, real = self._split(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise _fuse_error(exc.errno or errno.ENOENT)
        if stat.S_ISDIR(st.st_mode):
            return _dir_attrs(st)
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": st.st_size,
                "st_mtime": st.st_mtime_ns, "st_atime": st.st_atime_ns, "st_ctime": st.st_ctime_ns,
                "st_blocks": (st.st_size + 511) // 512}

    def readdir(self, path: str, fh) -> list[str]:
        if path == "/":
            return [".", "..", STATS_NAME, *sorted(self.views)]
        _, real = self._split(path)
        return [".", "..", *sorted(os.listdir(real))]

    # ---------------------------------------------------------------- files
    def open(self, path: str, fi) -> int:
        if fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise _fuse_error(errno.EROFS)
        if path == "/" + STATS_NAME:
            fh = next(self._stats_ids)
            self._stats[fh] = self.counters.snapshot()
            fi.fh, fi.direct_io = fh, 1
            return 0
        view, real = self._split(path)
        if view is None:
            raise _fuse_error(errno.EISDIR)
        fi.fh = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        self._fh_view[fi.fh] = view
        if self.direct_io:
            fi.direct_io = 1
        else:
            fi.keep_cache = 1  # reopening must not drop the node's page cache
        return 0

    def read(self, path: str, size: int, offset: int, fi) -> bytes:
        fh = fi.fh
        if fh >= STATS_FH_BASE:
            return self._stats.get(fh, b"")[offset:offset + size]
        data = os.pread(fh, size, offset)
        if data:
            import mfusepy
            slept = self.bucket.take(len(data))
            client = self.netns.client_of(mfusepy.fuse_get_context()[2])
            self.counters.add(client, self._fh_view.get(fh, "?"), len(data), slept)
        return data

    def release(self, path: str, fi) -> int:
        fh = fi.fh
        if fh >= STATS_FH_BASE:
            self._stats.pop(fh, None)
        else:
            self._fh_view.pop(fh, None)
            os.close(fh)
        return 0

    def statfs(self, path: str) -> dict:
        sv = os.statvfs(self.src)
        return {key: getattr(sv, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                                  "f_bavail", "f_files", "f_ffree", "f_namemax")}


def _dir_attrs(st: os.stat_result) -> dict:
    return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_size": 0,
            "st_mtime": st.st_mtime_ns, "st_atime": st.st_atime_ns, "st_ctime": st.st_ctime_ns}


def _fuse_error(code: int) -> OSError:
    import mfusepy
    return mfusepy.FuseOSError(code)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (libfuse unmounts on the way out)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src")
    p.add_argument("mountpoint")
    p.add_argument("--rate-mbps", type=float, required=True, help="aggregate cap, MB/s (10^6)")
    p.add_argument("--views", required=True, help="comma-separated view (node) names")
    p.add_argument("--direct-io", action="store_true")
    args = p.parse_args(argv)
    import mfusepy
    ops = StorageFS(args.src, [v for v in args.views.split(",") if v], args.rate_mbps * 1e6,
                    args.direct_io)
    mfusepy.FUSE(ops, os.path.abspath(args.mountpoint), raw_fi=True, foreground=True, ro=True,
                 fsname="weightcast-emu", subtype="wcemu", attr_timeout=3600, entry_timeout=3600,
                 negative_timeout=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
