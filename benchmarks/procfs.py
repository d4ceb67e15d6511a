"""Measurements a benchmark rank takes of itself and of the page cache.

- :func:`memory` reads ``/proc/self/smaps_rollup`` (PSS counts a page shared by k processes as
  1/k per process, so summing PSS over ranks counts shared pages once; RSS would count them k
  times) and the peak RSS (``VmHWM``);
- :func:`io_counters` reads ``/proc/self/io`` (``rchar``: bytes asked of ``read``-like system
  calls; ``read_bytes``: bytes this process made the block layer fetch);
- :func:`warm` and :func:`make_cold` put checkpoint files in, or out of, the page cache
  (this VM evicts page cache idle for about a minute: warm right before each trial);
- :func:`touch_all` reads one byte per 4 KiB page of every tensor a loader returned, so lazily
  mapped parameters are really loaded when the clock stops.

Called by :mod:`benchmarks.rank` (on every rank) and :mod:`benchmarks.physical`; no collectives.
"""
from __future__ import annotations

import ctypes
import glob
import os
import time
from typing import Any, Callable

PAGE = 4096
SCRATCH = 8 << 20


def checkpoint_files(source: str) -> list[str]:
    """Every ``*.safetensors`` file of a checkpoint directory (sorted)."""
    return sorted(glob.glob(os.path.join(source, "*.safetensors")))


def memory() -> dict[str, int]:
    """This process's smaps_rollup figures (bytes): pss, private (Private_Clean + Private_Dirty),
    anon (Anonymous: memory only this process can own), rss, shared; and peak_rss (VmHWM)."""
    fields: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    out = {"pss": fields.get("Pss", 0), "rss": fields.get("Rss", 0),
           "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
           "anon": fields.get("Anonymous", 0),
           "shared": fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0)}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                out["peak_rss"] = int(line.split()[1]) * 1024
    return out


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (so a trial's peak is its own)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc), so the next trial starts clean
    (cheap once the imported modules' objects are frozen: ``gc.freeze()`` in the rank)."""
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def io_counters(pid: int | str = "self") -> dict[str, int]:
    """``rchar`` and ``read_bytes`` of a process (whole thread group)."""
    out = {}
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("rchar", "read_bytes"):
                out[key] = int(value)
    return out


def warm(files: list[str], progress: Callable[[int], None] | None = None, force: bool = False) -> float:
    """Read every file not entirely in the page cache with large ``preadv`` requests (every
    file with ``force``); returns seconds."""
    import numpy as np
    buf = np.empty(SCRATCH, dtype=np.uint8)
    t0 = time.perf_counter()
    for path in files:
        if not force and resident_fraction([path]) >= 1.0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [buf], off)
                if n <= 0:
                    break
                off += n
                if progress is not None:
                    progress(n)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def make_cold(files: list[str]) -> None:
    """Drop the files' pages from the page cache (``posix_fadvise(DONTNEED)``; pages a live
    process still maps stay, so the previous trial's objects must be gone)."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files: list[str]) -> float:
    """Fraction of the files' pages in the page cache (``mincore``), to check warm/cold state."""
    import mmap

    import numpy as np
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    resident = total = 0
    for path in files:
        size = os.path.getsize(path)
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            pages = (size + PAGE - 1) // PAGE
            vec = ctypes.create_string_buffer(pages)
            libc.mincore(ctypes.c_void_p(addr), size, vec)
            resident += int((np.frombuffer(vec.raw, dtype=np.uint8) & 1).sum())
            total += pages
            libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else 1.0


def _tensors_of(obj: Any) -> list:
    import torch
    if isinstance(obj, torch.nn.Module):
        return list(obj.state_dict(keep_vars=False).values())
    if isinstance(obj, dict):
        return list(obj.values())
    return list(obj)


def touch_all(obj: Any) -> int:
    """Read one byte per page of every CPU tensor of a module, a state dict or a list (DTensors:
    the local shard); each storage range once. Returns the bytes covered."""
    import torch
    seen, total = set(), 0
    for t in _tensors_of(obj):
        if hasattr(t, "to_local"):
            t = t.to_local()
        if t.device.type != "cpu" or t.numel() == 0 or t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        flat = t.detach().reshape(-1)
        data = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        data[::PAGE].sum()
        total += data.numel()
    return total
