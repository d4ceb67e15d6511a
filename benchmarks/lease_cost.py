"""``python -m benchmarks.lease_cost [MB] [RUNS]``: what the node-shared read leases cost a load.

Writes a 6-shard checkpoint of about MB megabytes (float32, 4 MiB tensors; default 768) in a
temporary directory, then 3 local ranks (``weightcast.launch.local.spawn``) load it with the
node-shared transport RUNS times (default 5) with leases and RUNS times without, alternating
in the same processes (page cache warm after a first untimed load), and print the load's wall
seconds (``wall_seconds`` of the report: the slowest rank) min / median of each; then the
cost of the lease calls alone: taking, polling and releasing the leases of the 6 files, and
starting and stopping the thread that watches them.
The machine's load average is printed with them: the seconds are noisy on shared cores.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time


def write_checkpoint(root: str, mb: int, shards: int = 6) -> None:
    """``model-0000i-of-00006.safetensors`` + index, ``mb`` MB of 4 MiB float32 tensors."""
    import json
    import torch
    from safetensors.torch import save_file
    per_shard = max(1, mb * 1_000_000 // (4 << 20) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {f"layer{s}.w{i}": torch.rand(1 << 20) for i in range(per_shard)}
        save_file(part, os.path.join(root, file))
        weight_map.update({name: file for name in part})
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)


def job(args: dict) -> dict:
    """Every rank: one untimed load, then ``runs`` pairs of loads (leases on, off); -> rank 0's
    ``{"on": [seconds], "off": [seconds]}`` (the report's wall seconds)."""
    from weightcast.workers import file_lease
    from weightcast.workers.api import load_pretrained
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(1 + 2 * args["runs"]):
        mode = "on" if i % 2 else "off"
        file_lease.ENABLED = mode == "on"
        _, report = load_pretrained(args["root"], model=None, transport="node-shared", progress=False,
                                    return_report=True, timeout=300)
        if i:
            times[mode].append(report["wall_seconds"])
        unleased = report["ranks"][0]["unleased_files"]
        assert bool(unleased) == (mode == "off"), unleased
    return times


def lease_calls(root: str, repeat: int = 200) -> tuple[float, float, float]:
    """Seconds to take + release the leases of every file in ``root``, to poll them, and to
    start + stop the watching thread (min of ``repeat``)."""
    from weightcast.workers.file_lease import FileLeases
    files = [f for f in sorted(os.listdir(root)) if f.endswith(".safetensors")]
    take, poll, watch = [], [], []
    for _ in range(repeat):
        leases = FileLeases()
        t0 = time.perf_counter()
        for f in files:
            leases.take(f, os.path.join(root, f))
        t1 = time.perf_counter()
        leases.poll()
        t2 = time.perf_counter()
        leases.watch()
        leases.unwatch()
        t3 = time.perf_counter()
        leases.release()
        take.append(time.perf_counter() - t3 + t1 - t0)
        poll.append(t2 - t1)
        watch.append(t3 - t2)
    return min(take), min(poll), min(watch)


def main(argv: list[str]) -> int:
    from weightcast.launch.local import spawn
    mb = int(argv[0]) if argv else 768
    runs = int(argv[1]) if len(argv) > 1 else 5
    root = tempfile.mkdtemp(prefix="weightcast-lease-")
    try:
        write_checkpoint(root, mb)
        size = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))
        before = os.getloadavg()[0]
        results = spawn(3, "benchmarks.lease_cost:job", {"root": root, "runs": runs}, timeout=1800)
        times = results[0].value
        print(f"{size / 1e6:.0f} MB in 6 shards, 3 ranks node-shared, {runs} loads each way "
              f"(load average {before:.2f} before, {os.getloadavg()[0]:.2f} after):")
        for mode in ("on", "off"):
            t = times[mode]
            print(f"  leases {mode:>3}: min {min(t):.3f} s, median {statistics.median(t):.3f} s  {[round(x, 3) for x in t]}")
        take, poll, watch = lease_calls(root)
        print(f"  lease calls, 6 files: take + release {take * 1e6:.0f} us, one poll {poll * 1e6:.1f} us, "
              f"watching thread start + stop {watch * 1e6:.0f} us (min of 200)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
