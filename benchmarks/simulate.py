"""``weightcast plan --simulate`` with this machine's measured bandwidths, next to measured times.

:func:`cluster_yaml` writes a one-node cluster spec of N CPU ranks whose bandwidths are the ones
:mod:`benchmarks.physical` measured (storage = warm or cold read rate, memcpy, first touch, gloo
for the link between ranks); :func:`predict` runs ``weightcast plan SOURCE --cluster FILE
--device-map D --transport T --simulate --json`` in a subprocess and returns its prediction, or
why there is none (the command missing from this build, or failing). Called by
:mod:`benchmarks.bench` in the parent process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def cluster_yaml(path: str, world: int, phys: dict, cold: bool) -> str:
    storage = phys["cold_read_gbps"] if cold else phys["warm_read_gbps"]
    lines = [f"name: bench-local-{world}{'-cold' if cold else ''}", "storage: shared",
             f"storage_gbps: {storage:.3f}", f"memcpy_gbps: {phys['memcpy_gbps']:.3f}",
             f"first_touch_gbps: {phys['first_touch_gbps']:.3f}"]
    if phys.get("gloo_gbps"):
        lines.append(f"intra_node_gbps: {phys['gloo_gbps']:.3f}")
    host = phys.get("host_memory") or 16 << 30
    lines += ["nodes:", "  count: 1", f"  ranks_per_node: {world}", "  name_prefix: bench", f"  host_memory: {host}"]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def predict(source: str, cluster: str, device_map: str, transport: str) -> dict:
    """The ``--json`` summary of ``weightcast plan --simulate`` or ``{"error": why}``."""
    out = _plan(["--cluster", cluster], source, device_map, transport, simulate=True)
    if "error" not in out and "predicted_seconds" not in out:
        return {"error": "this build's weightcast plan has no --simulate prediction"}
    return {k: out[k] for k in ("error", "predicted_seconds", "lower_bound_seconds", "bound_by", "phases",
                                "total_read_bytes") if k in out}


def _plan(where: list[str], source: str, device_map: str, transport: str, simulate: bool,
          timeout: float = 120.0) -> dict:
    cmd = [sys.executable, "-m", "weightcast.launch.cli", "plan", source, *where, "--device-map", device_map,
           "--transport", transport, "--json", *(["--simulate"] if simulate else [])]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"weightcast plan could not run: {exc}"}
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"weightcast plan failed (exit {done.returncode}): {why}"}
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": "weightcast plan printed no JSON"}
