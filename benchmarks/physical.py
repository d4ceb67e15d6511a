"""The physical limits of this machine, measured: what no loader can beat here.

- ``cold_read_gbps``: the checkpoint files read after ``posix_fadvise(DONTNEED)``, 8 MiB
  ``preadv`` requests on two threads (storage -> page cache -> a reused buffer);
- ``warm_read_gbps``: the same with the files in the page cache (page cache -> user buffer);
- ``map_touch_gbps``: the files mapped privately and one byte per page read (what a zero-copy
  mmap loader such as ``from_pretrained`` must at least do per rank, warm);
- ``memcpy_gbps``: copying touched memory (512 MiB);
- ``first_touch_gbps``: writing fresh anonymous memory once (4 KiB pages, as torch allocates);
- ``gloo_gbps``: one gloo ``send``/``recv`` of 256 MiB between two local processes.

:func:`lower_bounds` turns them into the least time a load can take for a placement and N
(documented next to the formula). Called by :mod:`benchmarks.bench` in the parent process.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from benchmarks.procfs import PAGE, SCRATCH, checkpoint_files, make_cold, warm

GB = 1e9


def _read_all(files: list[str], threads: int = 2) -> int:
    """Read every file with ``threads`` readers of 8 MiB ``preadv`` requests; returns bytes."""
    import numpy as np
    jobs = [(p, off) for p in files for off in range(0, os.path.getsize(p), SCRATCH)]

    def work(part: list[tuple[str, int]]) -> int:
        buf = np.empty(SCRATCH, dtype=np.uint8)
        fds: dict[str, int] = {}
        total = 0
        try:
            for path, off in part:
                fd = fds.setdefault(path, os.open(path, os.O_RDONLY))
                total += os.preadv(fd, [buf], off)
        finally:
            for fd in fds.values():
                os.close(fd)
        return total

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(work, [jobs[i::threads] for i in range(threads)]))


def _rate(fn: Callable[[], int], repeat: int = 3) -> float:
    """Best GB/s of ``repeat`` runs of ``fn`` (which returns the bytes it moved)."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t0) / GB)
    return best


def map_touch(files: list[str]) -> int:
    """Map each file privately and read one byte per page (like a zero-copy loader); -> bytes."""
    import torch
    total = 0
    for path in files:
        size = os.path.getsize(path)
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
        t = torch.empty(0, dtype=torch.uint8).set_(storage)
        t[::PAGE].sum()
        total += size
        del t, storage
    return total


def memcpy_gbps(nbytes: int = 512 << 20) -> float:
    import torch
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    return _rate(lambda: dst.copy_(src).numel())


def first_touch_gbps(nbytes: int = 512 << 20) -> float:
    import torch

    def once() -> int:
        t = torch.empty(nbytes, dtype=torch.uint8)
        t[::PAGE] = 1
        return nbytes
    return _rate(once)


def gloo_rank(args: dict) -> dict:
    """One rank of the gloo bandwidth probe (run by :func:`weightcast.launch.local.spawn` on 2 ranks)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    buf = torch.ones(args["nbytes"], dtype=torch.uint8)
    best = 0.0
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        if dist.get_rank() == 0:
            dist.send(buf, 1)
        else:
            dist.recv(buf, 0)
        dist.barrier()
        best = max(best, args["nbytes"] / (time.perf_counter() - t0) / GB)
    dist.destroy_process_group()
    return {"gbps": best}


def gloo_gbps(nbytes: int = 256 << 20) -> float | None:
    from weightcast.launch.local import spawn
    try:
        results = spawn(2, "benchmarks.physical:gloo_rank", {"nbytes": nbytes}, timeout=300)
    except Exception:  # noqa: BLE001 - reported as not measured
        return None
    return results[0].value["gbps"]


def measure(source: str, progress: Callable[[str], None] | None = None) -> dict:
    """Every figure of the module docstring, for the checkpoint in ``source``."""
    files = checkpoint_files(source)
    size = sum(os.path.getsize(p) for p in files)
    out: dict = {"checkpoint": source, "bytes": size}
    say = progress or (lambda _msg: None)

    def cold() -> int:
        make_cold(files)
        return _read_all(files)

    say("cold read")
    out["cold_read_gbps"] = _rate(cold)
    say("warm read")
    warm(files, force=True)
    out["warm_read_gbps"] = _rate(lambda: _read_all(files))
    say("map + touch")
    out["map_touch_gbps"] = _rate(lambda: (warm(files), map_touch(files))[1])
    say("memcpy, first touch")
    out["memcpy_gbps"] = memcpy_gbps()
    out["first_touch_gbps"] = first_touch_gbps()
    say("gloo send/recv")
    out["gloo_gbps"] = gloo_gbps()
    out["cores"] = os.cpu_count() or 1
    return out


def lower_bounds(phys: dict, ckpt_bytes: int, world: int, cold: bool = False) -> dict[str, float]:
    """Least seconds for a load of ``ckpt_bytes`` on ``world`` local ranks, per placement.

    replicate: every rank must at least map and touch the whole checkpoint, ``world`` ranks in
    parallel on ``min(world, cores)`` cores: ``world x ckpt / (map_touch x min(world, cores))``;
    cold: at least ``max(ckpt / cold_read, that)`` (the read once from storage may overlap the
    touching). tp: every rank touches at least its 1/world share: ``ckpt / (map_touch x
    min(world, cores))``. Both assume perfect parallel scaling: real loaders pay more.
    """
    par = min(world, phys["cores"])
    touch = phys["map_touch_gbps"] * GB
    read = ckpt_bytes / (phys["cold_read_gbps"] * GB) if cold else 0.0
    return {"replicate": max(read, world * ckpt_bytes / (touch * par)),
            "tp": max(read, ckpt_bytes / (touch * par))}
