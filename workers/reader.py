"""Reading checkpoint bytes from storage.

``StorageReader`` is the one interface: ``read_into(file, offset, dest)`` fills ``dest`` (a
writable buffer) with exactly ``len(dest)`` bytes of ``file`` starting at ``offset``, or raises
:class:`StorageError`. ``FileReader`` is the real one (``os.preadv`` in large requests, files
checked against the size and mtime the plan recorded). Tests inject faulty readers through
:mod:`weightcast.workers.testing`. Every reader counts the bytes it read.

Readers are per rank and not collective; a reader may be used from several threads.
"""
from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Protocol

from weightcast.orchestrator.errors import StorageError, UnsafePathError
from weightcast.orchestrator.planner import FileStamp
from weightcast.orchestrator.prepare import CRC_PREFIX  # the checksums planning collects

MAX_REQUEST = 16 << 20  # one preadv call reads at most this much


class StorageReader(Protocol):
    bytes_read: int

    def read_into(self, file: str, offset: int, dest: memoryview) -> None: ...

    def close(self) -> None: ...


def _check_name(root: str, file: str) -> str:
    if not file or "/" in file or "\\" in file or file in (".", "..") or "\0" in file:
        raise UnsafePathError("Refusing to read a file outside the checkpoint",
                              where=f"file {file!r} in {root}",
                              expected="a plain file name inside the checkpoint directory",
                              fix="check the plan and the index's weight_map")
    return os.path.join(root, file)


class FileReader:
    """Reads files of one checkpoint directory with ``os.preadv``.

    ``stamps`` (from the plan) are checked when a file is first opened: a file whose size or
    mtime changed since planning is a :class:`StorageError`, never a silent mix of versions.
    """

    def __init__(self, root: str, stamps: Iterable[FileStamp] = ()) -> None:
        self.root = root
        self.stamps = {s.name: s for s in stamps}
        self.bytes_read = 0
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                path = _check_name(self.root, file)
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    raise StorageError("Cannot open a checkpoint file", where=path,
                                       got=exc.strerror, fix="check the path and permissions") from exc
                check_stamp(path, os.fstat(fd), self.stamps.get(file))
                self._fds[file] = fd
            return fd

    def read_into(self, file: str, offset: int, dest: memoryview) -> None:
        fd = self._fd(file)
        view = memoryview(dest).cast("B")
        done = 0
        while done < len(view):
            part = view[done:done + MAX_REQUEST]
            try:
                n = os.preadv(fd, [part], offset + done)
            except OSError as exc:
                raise StorageError("Reading a checkpoint file failed", where=f"{file} at byte {offset + done}",
                                   got=exc.strerror, fix="check the storage; retry the load") from exc
            if n <= 0:
                raise StorageError("Short read: the file ended early", where=f"{file} at byte {offset + done}",
                                   expected=f"{len(view) - done} more bytes", got="end of file",
                                   fix="the file was truncated or replaced during the load; reload it")
            done += n
        with self._lock:
            self.bytes_read += done

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def check_stamp(path: str, st: os.stat_result, stamp: FileStamp | None) -> None:
    """Raise StorageError if the file's size or mtime differ from what the plan recorded."""
    if stamp is None:
        return
    if st.st_size != stamp.size or st.st_mtime_ns != stamp.mtime_ns:
        raise StorageError("A checkpoint file changed between planning and reading", where=path,
                           expected=f"size {stamp.size}, mtime_ns {stamp.mtime_ns}",
                           got=f"size {st.st_size}, mtime_ns {st.st_mtime_ns}",
                           fix="do not modify a checkpoint while it is loaded; run the load again")




def tensor_crc32(tensor) -> int:
    """zlib.crc32 of a tensor's raw bytes (row-major, as stored in safetensors)."""
    import torch
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy())) if flat.numel() else 0


def checksum_metadata(tensors: dict) -> dict[str, str]:
    """``__metadata__`` entries carrying each tensor's crc32, for ``verify_checksums`` loads."""
    return {f"{CRC_PREFIX}{name}": f"{tensor_crc32(t):08x}" for name, t in tensors.items()}


def check_crc32(name: str, file: str, tensor, expected: str) -> None:
    """Raise StorageError naming the tensor when its bytes do not match ``expected`` (hex)."""
    got = tensor_crc32(tensor)
    try:
        want = int(expected, 16)
    except ValueError:
        want = None
    if got != want:
        raise StorageError("A tensor's bytes do not match the checksum in the checkpoint", where=f"tensor {name!r} "
                           f"in file {file!r}", expected=f"crc32 {expected} (__metadata__)", got=f"crc32 {got:08x}",
                           fix="the file is corrupt or changed during the load: re-download or re-save it")


class ReadPool:
    """A few threads issuing large reads; ``submit`` returns a Future per request.

    Used by one rank for its own ReadItems, so reading bucket k+1 overlaps moving bucket k.
    """

    def __init__(self, reader: StorageReader, threads: int = 4) -> None:
        self.reader = reader
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="weightcast-read")

    def submit(self, file: str, offset: int, dest: memoryview,
               then: Callable[[], None] | None = None) -> Future:
        def job() -> None:
            self.reader.read_into(file, offset, dest)
            if then is not None:
                then()
        return self._pool.submit(job)

    def run(self, job: Callable[[], None]) -> Future:
        """Run any read job (e.g. through bounce buffers) on the pool."""
        return self._pool.submit(job)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
