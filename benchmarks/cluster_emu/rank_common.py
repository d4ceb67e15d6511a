"""What every benchmark rank does around its loader: cold start, synchronised timing, counters,
memory, one JSON record per trial.

Each ``rank_<loader>.py`` module calls :func:`main` with its load function. They run under
torchrun inside an emulated node (see :mod:`benchmarks.cluster_emu.run`): every rank calls
:func:`main` (collective). Per trial: each node's local rank 0 drops its node's page cache; all
ranks meet; rank 0 reads the storage and link counters; all start together; each rank loads
and touches every page it holds; all meet again (the trial's wall time ends there); rank 0
reads the counters again and gathers every rank's figures. Rank 0 writes ``--out``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from datetime import timedelta
from typing import Any, Callable

LoadFn = Callable[[str, argparse.Namespace], tuple[Any, dict]]


def parse_args(argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one rank of an emulated-cluster benchmark")
    p.add_argument("source", help="checkpoint directory as the ranks see it")
    p.add_argument("--out", required=True, help="JSON results (written by rank 0)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--mountpoint", required=True, help="the storage mount (for its counters)")
    p.add_argument("--switch", required=True, help="the switch namespace (for link counters)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--verify", action="store_true",
                   help="report a SHA-256 of every tensor loaded (tests compare them)")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def touch(tensor: Any) -> int:
    """Read one byte per 4 KiB page of a CPU tensor's storage (faults in lazy mmaps); -> bytes."""
    import torch
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    data = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    data[::4096].sum()
    return data.numel()


def touch_all(tensors: Any) -> int:
    """:func:`touch` every tensor of a state dict, a module or an iterable; -> bytes touched."""
    import torch
    if isinstance(tensors, torch.nn.Module):
        tensors = list(tensors.state_dict(keep_vars=False).values())
    elif isinstance(tensors, dict):
        tensors = list(tensors.values())
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += touch(t)
    return total


def digests(state: dict) -> dict[str, str]:
    """SHA-256 of each tensor's bytes (name -> hex), for ``--verify``."""
    import hashlib

    import torch
    out = {}
    for name, t in state.items():
        flat = t.detach().contiguous().reshape(-1)
        out[name] = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def memory_figures() -> dict:
    """This process's peak RSS since the last reset, RSS, PSS and USS (bytes)."""
    import psutil
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out["peak_rss" if line.startswith("VmHWM") else "rss"] = int(line.split()[1]) * 1024
    try:
        full = psutil.Process().memory_full_info()
        out["pss"], out["uss"] = int(full.pss), int(full.uss)
    except (psutil.Error, AttributeError):
        pass
    return out


def counters(args: argparse.Namespace) -> dict:
    """Storage bytes per client and link bytes per node, right now (rank 0 only)."""
    from benchmarks.cluster_emu.netns import sh
    from benchmarks.cluster_emu.storage import read_stats
    stats = read_stats(args.mountpoint)
    out = sh("ip", "-n", args.switch, "-s", "-j", "link", "show").stdout
    links = {item["ifname"]: {"rx": item["stats64"]["rx"]["bytes"], "tx": item["stats64"]["tx"]["bytes"]}
             for item in json.loads(out) if item["ifname"].startswith("p")}
    return {"storage_bytes": stats["total_bytes"], "storage_clients": stats["clients"],
            "storage_cpu_s": stats.get("cpu_s", 0.0), "links": links, "time": time.time(),
            "loadavg": os.getloadavg()[0], "reclaimed_pages": _reclaimed_pages(), "cpu": cpu_jiffies()}


def cpu_jiffies() -> list[int]:
    """Machine-wide CPU time so far (``/proc/stat``): [busy, total] in clock ticks; busy is
    everything but idle and iowait (the emulated links and storage run in the kernel and in the
    FUSE daemon, so this is what the whole emulation used)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return [0, 0]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return [sum(fields[:8]) - idle, sum(fields[:8])]


def _reclaimed_pages() -> int:
    """Pages the kernel reclaimed so far, machine-wide (``pgsteal_anon`` + ``pgsteal_file`` of
    /proc/vmstat): a trial during which this grows may have lost page-cache pages it read, and
    read them again."""
    total = 0
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith(("pgsteal_anon ", "pgsteal_file ")):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def delta(before: dict, after: dict) -> dict:
    """Counters of one trial: storage bytes (total and per client), link bytes per port."""
    clients = {k: v - before["storage_clients"].get(k, 0) for k, v in after["storage_clients"].items()}
    links = {port: {d: after["links"][port][d] - before["links"].get(port, {}).get(d, 0)
                    for d in ("rx", "tx")} for port in after["links"]}
    return {"storage_bytes": after["storage_bytes"] - before["storage_bytes"],
            "storage_clients": {k: v for k, v in clients.items() if v},
            "link_bytes": sum(v["rx"] for v in links.values()),
            "links": links, "storage_cpu_s": after.get("storage_cpu_s", 0) - before.get("storage_cpu_s", 0),
            "loadavg": [before.get("loadavg"), after.get("loadavg")],
            "reclaimed_bytes": 4096 * (after.get("reclaimed_pages", 0) - before.get("reclaimed_pages", 0)),
            **_cpu_delta(before.get("cpu"), after.get("cpu"))}


def _cpu_delta(before: list[int] | None, after: list[int] | None) -> dict:
    """The machine's CPU use during a trial: busy core-seconds and the busy fraction of all cores."""
    if not before or not after or after[1] <= before[1]:
        return {}
    busy, total = after[0] - before[0], after[1] - before[1]
    return {"cpu_busy_s": busy / os.sysconf("SC_CLK_TCK"), "cpu_busy_frac": busy / total,
            "cpu_cores": os.cpu_count()}


def _trial(load: LoadFn, args: argparse.Namespace, ident: dict) -> dict | None:
    import torch.distributed as dist
    from benchmarks.cluster_emu.storage import drop_cache
    if ident["local_rank"] == 0:
        drop_cache(args.source)
    gc.collect()
    _reset_peak_rss()
    base = memory_figures()
    dist.barrier()
    before = counters(args) if ident["rank"] == 0 else None
    dist.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    result, extra = load(args.source, args)
    cpu_s = time.process_time() - cpu0
    load_s = time.perf_counter() - t0
    dist.barrier()
    wall = time.perf_counter() - t0
    after = counters(args) if ident["rank"] == 0 else None
    mine = {**ident, "load_s": load_s, "cpu_s": cpu_s, **memory_figures(), "rss_before": base.get("rss", 0),
            **extra}
    del result
    gc.collect()
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if ident["rank"] != 0:
        return None
    return {"wall_s": wall, **delta(before, after), "ranks": ranks}


def identity() -> dict:
    """This rank's rank, local rank, node (``WEIGHTCAST_NODE``) and PID."""
    import torch.distributed as dist
    return {"rank": dist.get_rank(), "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "node": os.environ.get("WEIGHTCAST_NODE", ""), "pid": os.getpid()}


def run_trials(name: str, load: LoadFn, args: argparse.Namespace, out: str) -> None:
    """``args.trials`` cold trials of ``load`` on every rank (collective; the default process
    group must exist); rank 0 writes ``{"loader", "world_size", "trials": [...]}`` to ``out``."""
    import torch.distributed as dist
    ident = identity()
    trials = []
    for _ in range(args.trials):
        record = _trial(load, args, ident)
        if record is not None:
            trials.append(record)
            print(f"[{name}] trial {len(trials)}: {record['wall_s']:.2f} s, storage "
                  f"{record['storage_bytes'] / 1e9:.3f} GB, links {record['link_bytes'] / 1e9:.3f} GB",
                  flush=True)
    if ident["rank"] == 0:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"loader": name, "world_size": dist.get_world_size(), "trials": trials}, f,
                      indent=1)
        os.replace(tmp, out)
    dist.barrier()


def init_group(args: argparse.Namespace) -> None:
    """The gloo default group every loader of the run uses (torchrun's environment)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))


def main(name: str, load: LoadFn, args: argparse.Namespace,
         prepare: Callable[[argparse.Namespace], None] | None = None) -> int:
    """One loader alone (``python -m benchmarks.cluster_emu.rank_<loader>``): group, trials,
    results in ``args.out``."""
    import torch.distributed as dist
    init_group(args)
    if prepare is not None:
        prepare(args)
    run_trials(name, load, args, args.out)
    dist.destroy_process_group()
    return 0
