"""Writer processes for the reliability tests: another process changes a checkpoint file while
a load holds it (truncation, in-place write, rewrite restoring size and mtime, rename-replace).

A load's read leases make a truncation or an open for writing wait until the load ended, so a
rank never changes a file itself (it would wait for its own lease): :func:`start_writer` starts
a process that does, and returns once that process ended or is blocked by one of the rank's
leases; :func:`wait_writers` (before the rank exits) reports when each change happened.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

_WRITERS: list[Any] = []  # writer processes this rank started; waited for before it exits


def start_writer(kind: str, path: str) -> Any:
    """Start a process that changes ``path`` (:func:`change_file`), then return once it ended or
    is blocked by one of this process's read leases on the file (that lease's break is pending)."""
    leased = _my_leases(path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys; sys.path.insert(0, sys.argv[1]); from tests.file_writers import change_file; change_file(*sys.argv[2:])"
    size = os.environ.get("WC_TRUNCATE_TO", str(max(0, os.path.getsize(path) - 4)))
    writer = subprocess.Popen([sys.executable, "-S", "-c", code, root, kind, path, size], stdout=subprocess.PIPE, text=True)
    _WRITERS.append(writer)
    deadline = time.monotonic() + 20
    while writer.poll() is None and not _any_break(leased) and time.monotonic() < deadline:
        time.sleep(0.005)
    return writer


def change_file(kind: str, path: str, size: str) -> None:
    """In a writer process: change ``path`` as ``kind`` says, then print the wall time it ended."""
    if kind == "truncate":
        os.truncate(path, int(size))
    elif kind in ("rewrite-same", "replace"):
        _rewrite_keeping_size_and_mtime(path, kind == "replace")
    else:  # "rewrite" (a new mtime too) or "open" (an in-place writer: one byte flipped)
        with open(path, "r+b") as fh:
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
            fh.seek(-1, os.SEEK_END)
            fh.write(bytes([last[0] ^ 0xFF]))
        if kind == "rewrite":
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    print(time.time(), flush=True)


def _my_leases(path: str) -> list[int]:
    """This process's descriptors of ``path`` that hold a read lease."""
    import fcntl
    real, out = os.path.realpath(path), []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == real and fcntl.fcntl(int(fd), fcntl.F_GETLEASE) == fcntl.F_RDLCK:
                out.append(int(fd))
        except OSError:
            pass
    return out


def _any_break(fds: list[int]) -> bool:
    import fcntl
    try:
        return any(fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK for fd in fds)
    except OSError:  # released meanwhile
        return True


def wait_writers(timeout: float = 20.0) -> list[dict]:
    """Wait for this rank's writers: ``[{"returncode", "done"}]`` (``done``: the wall time the
    change ended, None if it did not)."""
    out = []
    for writer in _WRITERS:
        try:
            text, _ = writer.communicate(timeout=timeout)
        except Exception:  # noqa: BLE001 - a writer still blocked: reported as not done
            writer.kill()
            text, _ = writer.communicate()
        done = text.strip().splitlines()[-1] if text and text.strip() else None
        out.append({"returncode": writer.returncode, "done": float(done) if done else None})
    _WRITERS.clear()
    return out


def _rewrite_keeping_size_and_mtime(path: str, replace: bool) -> None:
    """Flip the file's last byte, in place or as a new file renamed over it, and restore its
    size and mtime: only the inode or the ctime tell."""
    st = os.stat(path)
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    data[-1] ^= 0xFF
    target = path + ".new" if replace else path
    with open(target, "r+b" if not replace else "wb") as fh:
        fh.write(data)
    if replace:
        os.replace(target, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
