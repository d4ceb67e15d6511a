"""One rank of a benchmark job: ``torchrun --standalone --nproc-per-node N -m benchmarks.rank SPEC``.

``SPEC`` is a JSON file written by :mod:`benchmarks.bench`: the checkpoints (``sources``: name ->
directory), the steps to run in order (``[loader, trial, checkpoint, mode]``, mode ``warm``,
``cold`` or ``none`` (page cache left as it is); trials of different loaders interleaved so that
a noisy moment of the machine is shared among them), and where rank 0 appends results (one JSON
line per trial). Every rank runs every trial (collective):

1. local rank 0 warms the checkpoint files (large reads) or drops them from the page cache;
2. all ranks meet (gloo barrier), then start their clocks together;
3. each rank loads and touches one byte per page of everything it got (lazy mmaps really load);
4. all ranks meet again: the trial's wall time is rank 0's clock at that point;
5. each rank reads its PSS / private / anonymous memory and its ``/proc/self/io`` counters,
   the figures are gathered to rank 0, which appends one line to the results file.

A loader that raises on any rank makes that rank write ``<results>.fail.<rank>`` and exit at
once; torchrun then stops the job and the parent relaunches it with the loaders not yet run.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from typing import NamedTuple


class Step(NamedTuple):
    """One trial: a loader on a checkpoint with the page cache ``warm``, ``cold`` or ``none``."""
    loader: str
    trial: int
    checkpoint: str
    mode: str


def _ident() -> dict:
    return {"rank": int(os.environ.get("RANK", 0)), "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "world": int(os.environ.get("WORLD_SIZE", 1)), "pid": os.getpid()}


def _set_cache(mode: str, files: list[str], ident: dict) -> dict:
    """Warm or cold page cache for the checkpoint (local rank 0 only); returns what was done."""
    from benchmarks.procfs import make_cold, resident_fraction, warm
    os.environ["FASTSAFETENSORS_ODIRECT"] = "1" if mode == "cold" else "0"  # read per call
    if ident["local_rank"] != 0 or mode == "none":
        return {}
    if mode == "cold":
        make_cold(files)
        return {"resident_before": resident_fraction(files)}
    seconds = warm(files)
    return {"warm_s": seconds, "resident_before": resident_fraction(files)}


def _trial(step: Step, source: str, ctx: dict, gpu: bool, ident: dict) -> dict | None:
    import torch.distributed as dist
    from benchmarks import procfs
    from benchmarks.loaders import load_function
    load = load_function(step.loader)
    procfs.release_memory()
    cache = _set_cache(step.mode, procfs.checkpoint_files(source), ident)
    procfs.reset_peak_rss()
    base = procfs.memory()
    dist.barrier()
    io0 = procfs.io_counters()
    t0 = time.perf_counter()
    result, extra = load(source, ctx)
    touched = procfs.touch_all(result)
    if gpu:
        import torch
        torch.cuda.synchronize()
    mine_s = time.perf_counter() - t0
    dist.barrier()
    wall = time.perf_counter() - t0
    io1 = procfs.io_counters()
    mem = procfs.memory()
    dist.barrier()  # every rank measured while every other still holds its result
    report = extra.pop("report", None)
    record = {**ident, "seconds": mine_s, "touched": touched, "base": base, "mem": mem,
              "rchar": io1["rchar"] - io0["rchar"], "read_bytes": io1["read_bytes"] - io0["read_bytes"],
              **extra, **cache}
    del result
    ranks: list = [None] * ident["world"]
    dist.all_gather_object(ranks, record)
    if ident["rank"] != 0:
        return None
    return {"loader": step.loader, "checkpoint": step.checkpoint, "mode": step.mode, "trial": step.trial,
            "world": ident["world"], "wall_s": wall, "ranks": ranks, "report": report, "time": time.time()}


def _context(name: str, source: str, spec: dict, world: int) -> dict:
    ctx = {"timeout": spec.get("timeout", 300.0)}
    if name == "fastsafetensors_tp":
        from benchmarks.loaders import tp_dims
        ctx["tp_dims"] = tp_dims(source, world)
    return ctx


def run(spec: dict) -> int:
    """Every rank: each step of the spec; rank 0 appends one record per step."""
    import torch.distributed as dist
    from benchmarks.loaders import prepare
    ident = _ident()
    backend = "gloo"
    if spec.get("gpu"):  # control over gloo, tensor data over NCCL
        import torch
        torch.cuda.set_device(ident["local_rank"])
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=spec.get("timeout", 300.0)))
    if ident["rank"] == 0:
        _append(spec["results"], {"event": "started", "time": time.time(), "t_launch": spec.get("t_launch")})
    prepared: dict[tuple[str, str], dict] = {}
    for raw in spec["steps"]:
        step = Step(*raw)
        source = spec["sources"][step.checkpoint]
        try:
            if (step.loader, step.checkpoint) not in prepared:
                prepare(step.loader, source)
                prepared[step.loader, step.checkpoint] = _context(step.loader, source, spec, ident["world"])
                gc.collect()
                gc.freeze()  # imported modules' objects: later collections skip them (untimed, faster)
            record = _trial(step, source, prepared[step.loader, step.checkpoint], bool(spec.get("gpu")), ident)
            if record is not None:
                _append(spec["results"], record)
        except Exception as exc:  # noqa: BLE001 - recorded, then the job stops (others may be stuck)
            _fail(spec, ident, step, exc)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _append(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _fail(spec: dict, ident: dict, step: Step, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    with open(f"{spec['results']}.fail.{ident['rank']}", "w") as fh:
        json.dump({"loader": step.loader, "checkpoint": step.checkpoint, "mode": step.mode, "rank": ident["rank"],
                   "error": f"{type(exc).__name__}: {exc}", "traceback": text[-4000:]}, fh)
    sys.stderr.write(text)
    sys.stderr.flush()
    os._exit(3)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as fh:
        spec = json.load(fh)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
