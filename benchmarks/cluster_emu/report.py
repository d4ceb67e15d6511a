"""Results of a sweep: per loader and node count a summary row, the cost model's prediction, a
Markdown table, a JSON file and a plot of time against the number of nodes.

Called by :mod:`benchmarks.cluster_emu.run` on the host after each node count. Pure apart from
:func:`predict` (runs ``weightcast plan --simulate``), :func:`write_results` and :func:`plot`.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from benchmarks.cluster_emu.loaders import LOADERS
from benchmarks.cluster_emu.storage import REPO_ROOT
from benchmarks.cluster_emu.topology import TBF_GOODPUT, Topology


def predict(src: str, cluster_yaml: str, device_map: str, timeout: float = 180) -> dict:
    """``weightcast plan SRC --cluster YAML --device-map M --simulate --json`` ->
    ``{"predicted_s", "lower_bound_s", "bound_by", ...}`` (``predicted_s`` includes the first access
    to the views' pages, which the benchmark times), or ``{"error": why}`` when the command is
    missing or fails (the sweep goes on without a prediction)."""
    cmd = [sys.executable, "-m", "weightcast.launch.cli", "plan", src, "--cluster", cluster_yaml,
           "--device-map", device_map, "--simulate", "--json"]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"weightcast plan did not run: {exc}"}
    if proc.returncode != 0:
        return {"error": f"weightcast plan exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[-300:]}"}
    try:
        data = json.loads(proc.stdout)
        access = float(data.get("phases", {}).get("first_access", 0.0))
        # the benchmark touches every page of what a rank holds: mapping the views' pages is in
        # its time, not in the load's prediction
        return {"predicted_s": float(data["predicted_seconds"]) + access,
                "load_predicted_s": float(data["predicted_seconds"]), "first_access_s": access,
                "phases": data.get("phases", {}),
                "lower_bound_s": float(data.get("lower_bound_seconds", 0.0)),
                "bound_by": data.get("bound_by", ""), "total_read_bytes": data.get("total_read_bytes")}
    except (ValueError, KeyError, TypeError) as exc:
        return {"error": f"weightcast plan --simulate --json gave no predicted_seconds: {exc}"}


def baseline_model(key: str, topo: Topology, ckpt_bytes: int) -> float | None:
    """A bandwidth model for the baselines (seconds): every node reads the whole checkpoint
    through the shared cap (naive, from_pretrained); fastsafetensors reads it once, then each
    file's reader broadcasts it one-to-all, so a node's uplink carries one copy per remote rank."""
    s = topo.storage_bytes_per_s
    link = topo.link_bytes_per_s * TBF_GOODPUT
    n, k = topo.nodes, topo.ranks_per_node
    if key in ("naive", "hf"):
        return n * ckpt_bytes / s
    if key == "fst":
        return ckpt_bytes / s + (n - 1) * k * ckpt_bytes / (n * link)
    return None


def summarize(key: str, result: dict, topo: Topology, ckpt_bytes: int) -> dict:
    """One table row from rank 0's results of ``key`` on ``topo``."""
    row = {"loader": LOADERS[key].label, "key": key, "nodes": topo.nodes,
           "ranks_per_node": topo.ranks_per_node}
    if "error" in result:
        return {**row, "error": result["error"]}
    trials = result["trials"]
    walls = [t["wall_s"] for t in trials]
    peak = [max(r["peak_rss"] - r.get("rss_before", 0) for r in t["ranks"]) for t in trials]
    pss = [max(r.get("pss", 0) for r in t["ranks"]) for t in trials]
    storage = [t["storage_bytes"] for t in trials]
    links = [t["link_bytes"] for t in trials]
    busiest = [max((max(v.values()) for v in t.get("links", {}).values()), default=0) for t in trials]
    loads = [x for t in trials for x in t.get("loadavg", []) if x is not None]
    return {**row, "trials": len(trials), "wall_min_s": min(walls),
            "wall_median_s": statistics.median(walls), "walls_s": walls,
            "storage_bytes": int(statistics.median(storage)),
            "storage_x": statistics.median(storage) / ckpt_bytes,
            "link_bytes": int(statistics.median(links)),
            "busiest_link_bytes": int(statistics.median(busiest)),
            "peak_rss_bytes": int(statistics.median(peak)), "pss_bytes": int(statistics.median(pss)),
            "storage_cpu_s": statistics.median(t.get("storage_cpu_s", 0.0) for t in trials),
            "loadavg_max": max(loads, default=None),
            "cpu_busy_frac": statistics.median(t.get("cpu_busy_frac", 0.0) for t in trials),
            "rank_cpu_s": statistics.median(sum(r.get("cpu_s", 0.0) for r in t["ranks"]) for t in trials),
            "reclaimed_bytes_max": max(t.get("reclaimed_bytes", 0) for t in trials)}


def markdown_table(rows: list[dict]) -> str:
    """The BENCHMARKS.md table of the rows (one per loader and node count)."""
    lines = ["| loader | nodes x ranks | time min / median (s) | storage read (x ckpt) | "
             "links: total / busiest (GB) | peak memory per rank (GB) | predicted (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['nodes']} x {r['ranks_per_node']}"
        if "error" in r:
            lines.append(f"| {r['loader']} | {shape} | failed: {_one_line(r['error'])} | | | | |")
            continue
        model = r.get("model_s")
        lines.append(
            f"| {r['loader']} | {shape} | {r['wall_min_s']:.2f} / {r['wall_median_s']:.2f} | "
            f"{r['storage_bytes'] / 1e9:.3f} GB ({r['storage_x']:.2f}x) | "
            f"{r['link_bytes'] / 1e9:.2f} / {r.get('busiest_link_bytes', 0) / 1e9:.2f} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} | "
            f"{'-' if model is None else f'{model:.2f}'} |")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:120].replace("|", "/")


def write_results(path: str, data: dict, rows: list[dict]) -> None:
    """``path``.json (everything) and ``path``.md (the table), atomically."""
    for suffix, text in ((".json", json.dumps({**data, "rows": rows}, indent=1)),
                         (".md", markdown_table(rows) + "\n")):
        tmp = path + suffix + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path + suffix)


def plot(path: str, rows: list[dict]) -> str | None:
    """Median time against the number of nodes, one line per loader (needs matplotlib);
    -> the PNG's path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label in dict.fromkeys(r["loader"] for r in rows):
        pts = sorted((r["nodes"], r["wall_median_s"], r["wall_min_s"]) for r in rows
                     if r["loader"] == label and "error" not in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("emulated nodes")
    ax.set_ylabel("load time, median of the trials (s)")
    ax.set_xticks(sorted({r["nodes"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
