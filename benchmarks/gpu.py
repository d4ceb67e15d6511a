"""``weightcast bench --gpu``: page cache -> GPU memory on CUDA machines.

Figures (only where CUDA is available; otherwise :func:`run` returns ``measured: False`` with
the reason, and nothing is invented):

- ``h2d_one_gpu_gbps``: the checkpoint read (warm page cache) into two reusable pinned buffers of
  64 MiB with ``preadv`` and copied to GPU 0 with ``non_blocking`` copies, read of buffer k+1
  overlapping the copy of buffer k: the single-GPU ceiling of any loader here;
- per loader on every visible GPU (one rank per GPU, NCCL for data, gloo for control):
  ``safetensors.torch.load_file(device="cuda:k")`` per rank, fastsafetensors (files per rank,
  ``nogds``, broadcast over NCCL) and weightcast ``replicate`` with the ``collective`` transport
  (pinned buffers, NCCL broadcasts); GB/s = N x checkpoint / wall seconds.

Called by :mod:`benchmarks.bench` in the parent process; the per-rank loads run through
:mod:`benchmarks.jobs` with the ``gpu_*`` loaders of :mod:`benchmarks.loaders`.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from benchmarks.procfs import checkpoint_files, warm

GPU_LOADERS = ("gpu_load_file", "gpu_fastsafetensors", "gpu_wc_replicate_collective")
BUFFER = 64 << 20


def cuda_status() -> tuple[bool, str]:
    """Whether CUDA can be used here, and if not, why."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
        return False, f"no CUDA device on this machine ({build}, torch {torch.__version__})"
    return True, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def h2d_gbps(files: list[str], device: str = "cuda:0") -> float:
    """Page cache -> pinned buffers -> one GPU, double-buffered (see the module docstring)."""
    import torch
    warm(files)
    bufs = [torch.empty(BUFFER, dtype=torch.uint8).pin_memory() for _ in range(2)]
    events = [None, None]
    dst = torch.empty(BUFFER, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    total, k = 0, 0
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            off = 0
            while True:
                if events[k % 2] is not None:
                    events[k % 2].synchronize()
                n = os.preadv(fd, [bufs[k % 2].numpy()], off)
                if n <= 0:
                    break
                with torch.cuda.stream(stream):
                    dst[:n].copy_(bufs[k % 2][:n], non_blocking=True)
                    events[k % 2] = torch.cuda.Event()
                    events[k % 2].record(stream)
                off += n
                total += n
                k += 1
        finally:
            os.close(fd)
    torch.cuda.synchronize(device)
    return total / (time.perf_counter() - t0) / 1e9


def run(name: str, source: str, workdir: str, trials: int, on_record: Callable[[dict], None] | None = None) -> dict:
    """Every GPU figure for checkpoint ``source``, or ``{"measured": False, "reason": ...}``."""
    ok, what = cuda_status()
    if not ok:
        return {"measured": False, "reason": what}
    import torch
    from benchmarks.jobs import run_job
    out: dict = {"measured": True, "devices": what, "h2d_one_gpu_gbps": h2d_gbps(checkpoint_files(source))}
    world = torch.cuda.device_count()
    steps = [[loader, t, name, "warm"] for t in range(trials) for loader in GPU_LOADERS]
    job = run_job({name: source}, world, steps, workdir, f"gpu-n{world}", on_record=on_record,
                  extra_spec={"gpu": True})
    out["records"], out["failures"] = job.records, job.failures
    return out
