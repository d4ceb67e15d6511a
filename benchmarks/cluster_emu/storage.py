"""Start, query and stop the emulated shared storage (the FUSE daemon of
:mod:`benchmarks.cluster_emu.storagefs`).

Called by the harness on the host (root): :func:`start_storage` mounts ``SRC`` at
``topo.mountpoint`` with one view per node and returns the daemon's PID; :func:`stop_storage`
unmounts and ends that PID. :func:`read_stats` and :func:`drop_cache` also run inside the rank
processes (rank 0 reads the counters around each trial; each node's local rank 0 drops its
node's page cache before each trial).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from benchmarks.cluster_emu.netns import sh
from benchmarks.cluster_emu.topology import STATS_NAME, EmulationError, Topology

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def start_storage(topo: Topology, src: str, *, direct_io: bool = False,
                  timeout: float = 20) -> int:
    """Mount ``src`` (a checkpoint directory) under ``topo.mountpoint``; -> the daemon's PID.
    Stops a daemon already mounted there first (idempotent)."""
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise EmulationError(f"Checkpoint directory not found: {src}")
    stop_storage(topo)
    os.makedirs(topo.mountpoint, exist_ok=True)
    os.makedirs(topo.ckpt_path, exist_ok=True)
    log = open(os.path.join(topo.workdir, "storagefs.log"), "ab")
    cmd = [sys.executable, "-m", "benchmarks.cluster_emu.storagefs", src, topo.mountpoint,
           "--rate-mbps", str(topo.storage_mbps), "--views", ",".join(topo.node_names)]
    if direct_io:
        cmd.append("--direct-io")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    _write_pid(topo, proc.pid)
    deadline = time.monotonic() + timeout
    while not is_mounted(topo.mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_storage(topo)
            raise EmulationError(f"The storage daemon did not mount {topo.mountpoint}; see "
                                 f"{os.path.join(topo.workdir, 'storagefs.log')}")
        time.sleep(0.05)
    _set_read_ahead(topo.mountpoint, topo.read_ahead_kb)
    read_stats(topo.mountpoint)  # answers: the daemon serves requests
    return proc.pid


def _set_read_ahead(mountpoint: str, kb: int) -> None:
    """Set the read-ahead of this FUSE mount's own backing device info (gone with the mount):
    1 MiB gives 1 MiB requests (like an NFS client with rsize=1M) where the kernel default gives
    128 KiB ones; 0 reads exactly the pages asked for, one page per request."""
    dev = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError:
        pass  # keeps the kernel default (128 KiB requests): slower, still correct


def _pid_file(topo: Topology) -> str:
    return os.path.join(topo.workdir, "storagefs.pid")


def _write_pid(topo: Topology, pid: int) -> None:
    with open(_pid_file(topo), "w") as f:
        f.write(f"{pid}\n")


def stop_storage(topo: Topology, timeout: float = 10) -> None:
    """Unmount the storage and end the daemon recorded in the workdir (by its PID)."""
    pid = _read_pid(topo)
    if is_mounted(topo.mountpoint):
        if sh("fusermount3", "-u", topo.mountpoint, check=False).returncode != 0:
            sh("fusermount3", "-u", "-z", topo.mountpoint, check=False)
    if pid is not None and _is_our_daemon(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_our_daemon(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _is_our_daemon(pid):
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
    if is_mounted(topo.mountpoint):
        sh("umount", "-l", topo.mountpoint, check=False)
    if os.path.exists(_pid_file(topo)):
        os.unlink(_pid_file(topo))


def _read_pid(topo: Topology) -> int | None:
    try:
        with open(_pid_file(topo)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _is_our_daemon(pid: int) -> bool:
    """True while ``pid`` is alive and runs the storage daemon (guards against PID reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"benchmarks.cluster_emu.storagefs" in cmdline and state != "Z"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def read_stats(mountpoint: str) -> dict:
    """The daemon's counters: ``total_bytes``, ``clients`` {namespace: bytes}, ``views``..."""
    path = os.path.join(mountpoint, STATS_NAME)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise EmulationError(f"Cannot read the storage counters at {path}: {exc}") from None


def drop_cache(directory: str) -> int:
    """Drop the page cache of every file under ``directory`` (``posix_fadvise(DONTNEED)``); run
    by each node's local rank 0 on its view so the next trial starts cold. -> files dropped."""
    count = 0
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count
