"""Where the node-shared transport's bytes live: shared-memory areas and file mappings.

- :class:`Areas`: one ``/dev/shm`` area per node and file for bytes read on other nodes
  (object storage: for every byte), written once by the receiving rank; a shared ``flock``
  marks an area in use, so :func:`reclaim_stale` removes only those of dead loads and
  :func:`remove_areas` those of one load (survivors call it after an error).
- :class:`FileMaps`: this rank's private (copy-on-write) mappings of the checkpoint files;
  :class:`StagedMaps` stands in for them when there is no file to map (object storage).
Per rank, not collective.
"""
from __future__ import annotations

import fcntl
import glob
import os
from typing import Callable

import torch

from weightcast.orchestrator.errors import StorageError
from weightcast.orchestrator.planner import LoadPlan
from weightcast.workers.reader import check_stamp


SHM_DIR = "/dev/shm"
PREFIX = "weightcast-"


def shm_path(load_id: str, node_index: int, file_index: int) -> str:
    return os.path.join(SHM_DIR, f"{PREFIX}{load_id}-n{node_index}-f{file_index}")


def check_space(plan: LoadPlan, node: str, staged: bool, shm_dir: str = SHM_DIR) -> int:
    """Every rank, before any area is written: the bytes this node will stage in ``shm_dir`` (what
    it receives from other nodes, what its ranks read of the tensors it also receives (mirrored
    into the areas), and what its ranks read when a ``staged`` reader reads into the areas) must fit the free space there, else a StorageError naming the directory, the bytes
    needed and free, and the fix (tmpfs pages written past its size would make the writers hang
    or die of SIGBUS). -> the bytes needed. Not collective."""
    from weightcast.orchestrator.planner import node_cross_bytes
    ranks = {r for n, rs in plan.nodes if n == node for r in rs}
    need = 0
    if len(plan.nodes) > 1:  # received over the ring, plus the node's own reads of such tensors (mirrored)
        need = node_cross_bytes(plan)[node][1]
        ringed = {c.tensor for c in plan.chunks if c.reader not in ranks and any(r in ranks for r in c.consumers)}
        need += sum(c.length for c in plan.chunks if c.reader in ranks and c.tensor in ringed)
    if staged:
        need += sum(i.length for i in plan.reads if i.rank in ranks)
    if not need:
        return 0
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return need
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise StorageError("Not enough shared memory for this node's staging areas", where=f"{shm_dir} on node {node}",
                           expected=f"{need:,} bytes free (bytes this node receives from other nodes)",
                           got=f"{free:,} bytes free of {st.f_blocks * st.f_frsize:,}",
                           fix=f"enlarge {shm_dir} (mount -o remount,size=... {shm_dir}; docker run --shm-size), "
                               "free it, or load with transport='collective'")
    return need


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


class Areas:
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


class FileMaps:
    """This rank's private (copy-on-write) mappings of the checkpoint files, one per file,
    checked against the size and mtime the plan recorded (a changed file is an error, never a
    SIGBUS later)."""

    def __init__(self, root: str, plan: LoadPlan,
                 on_map: Callable[[str, torch.UntypedStorage], None] | None = None) -> None:
        self.root = root
        self.stamps = {s.name: s for s in plan.files}
        self.maps: dict[str, torch.Tensor] = {}
        self.on_map = on_map  # told (file, storage) of each mapping (the file guard)

    def get(self, file: str) -> torch.Tensor:
        if file not in self.maps:
            path = os.path.join(self.root, file)
            stamp = self.stamps[file]
            check_stamp(path, os.stat(path), stamp)
            storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=stamp.size)
            if self.on_map is not None:
                self.on_map(file, storage)
            self.maps[file] = torch.empty(0, dtype=torch.uint8).set_(storage)
        return self.maps[file]


class StagedMaps:
    """Object storage (a reader marked ``staged``): there is no file to map; what the node reads
    itself lands in the same shared-memory areas as bytes from other nodes."""

    def __init__(self, areas: Areas) -> None:
        self.areas = areas

    def get(self, file: str) -> torch.Tensor:
        return self.areas.writable(file)
