"""From trial records to figures: per (checkpoint, mode, N, loader) rows, ratios to weightcast,
the target checks, markdown tables and PNG plots.

A row's figures: ``min_s`` / ``median_s`` of the trials' wall seconds (barrier to barrier, every
page touched); ``pss_sum`` the median over trials of the ranks' summed PSS after the load;
``private_max`` / ``anon_max`` the largest per-rank Private_Clean+Private_Dirty / Anonymous;
``anon_load_max`` the largest per-rank growth of anonymous memory during the load (what the load
made private); ``requested`` bytes the ranks asked storage for (see :mod:`benchmarks.loaders`);
``rchar`` bytes of read system calls; ``device_read`` bytes the block layer fetched (cold runs).
Ratios are weightcast / loader for the weightcast row of the same placement (min times, median
PSS). Called by :mod:`benchmarks.bench` after the runs; pure except for the plots.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

from benchmarks.loaders import LOADERS

GBF = 1e9
REFERENCE = {"replicate": "wc_replicate_node-shared", "tp": "wc_tp_node-shared", "auto": "wc_auto_node-shared"}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _requested(loader: str, trial: dict) -> int:
    ranks = trial["ranks"]
    how = LOADERS[loader].requested if loader in LOADERS else "rchar"
    if how == "rchar":
        return sum(r["rchar"] for r in ranks)
    if how == "device":  # O_DIRECT reads bypass read() accounting and the page cache
        return sum(r["read_bytes"] for r in ranks)
    return sum(r.get("requested") or 0 for r in ranks)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (checkpoint, mode, world, loader), in the order first seen."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["checkpoint"], r["mode"], r["world"], r["loader"])].append(r)
    rows = []
    for (ckpt, mode, world, loader), trials in groups.items():
        times = [t["wall_s"] for t in trials]
        rows.append({
            "checkpoint": ckpt, "mode": mode, "world": world, "loader": loader, "trials": len(trials),
            "min_s": min(times), "median_s": _median(times),
            "pss_sum": _median([sum(r["mem"]["pss"] for r in t["ranks"]) for t in trials]),
            "pss_base_sum": _median([sum(r["base"]["pss"] for r in t["ranks"]) for t in trials]),
            "private_max": _median([max(r["mem"]["private"] for r in t["ranks"]) for t in trials]),
            "anon_max": _median([max(r["mem"]["anon"] for r in t["ranks"]) for t in trials]),
            "anon_load_max": _median([max(r["mem"]["anon"] - r["base"]["anon"] for r in t["ranks"])
                                      for t in trials]),
            "peak_rss_max": _median([max(r["mem"].get("peak_rss", 0) for r in t["ranks"]) for t in trials]),
            "requested": _median([_requested(loader, t) for t in trials]),
            "rchar": _median([sum(r["rchar"] for r in t["ranks"]) for t in trials]),
            "device_read": _median([sum(r["read_bytes"] for r in t["ranks"]) for t in trials]),
            "touched": _median([sum(r["touched"] for r in t["ranks"]) for t in trials]),
        })
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    index = {(r["checkpoint"], r["mode"], r["world"], r["loader"]): r for r in rows}
    for r in rows:
        placement = LOADERS[r["loader"]].placement if r["loader"] in LOADERS else "replicate"
        ref = index.get((r["checkpoint"], r["mode"], r["world"], REFERENCE[placement]))
        r["ref"] = ref["loader"] if ref else None
        r["wc_time_ratio"] = ref["min_s"] / r["min_s"] if ref and r["min_s"] else None
        r["wc_pss_ratio"] = ref["pss_sum"] / r["pss_sum"] if ref and r["pss_sum"] else None


def find(rows: list[dict], checkpoint: str, mode: str, world: int, loader: str) -> dict | None:
    for r in rows:
        if (r["checkpoint"], r["mode"], r["world"], r["loader"]) == (checkpoint, mode, world, loader):
            return r
    return None


def _gb(n: float | None, unit: float = GBF) -> str:
    return "-" if n is None else f"{n / unit:.2f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(rows: list[dict], ckpt_bytes: int) -> str:
    """A markdown table of rows (one checkpoint and mode), grouped by N (GB, or MB for checkpoints
    under 1 GB)."""
    u, name = (GBF, "GB") if ckpt_bytes >= GBF else (1e6, "MB")
    head = (f"| N | loader | trials | min s | median s | weightcast ÷ loader, time | summed PSS {name} | weightcast ÷ "
            f"loader, PSS | max private / rank {name} | max anon / rank {name} (load's own) | requested from "
            f"storage {name} (x ckpt) | read() {name} | block-device reads {name} |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["world"], _order(r["loader"]))):
        label = LOADERS[r["loader"]].label if r["loader"] in LOADERS else r["loader"]
        label = f"**{label}**" if r["loader"].startswith("wc_") else label
        out.append(f"| {r['world']} | {label} | {r['trials']} | {r['min_s']:.2f} | {r['median_s']:.2f} | {_x(r['wc_time_ratio'])} | "
                   f"{_gb(r['pss_sum'], u)} | {_x(r['wc_pss_ratio'])} | {_gb(r['private_max'], u)} | "
                   f"{_gb(r['anon_max'], u)} ({_gb(r['anon_load_max'], u)}) | {_gb(r['requested'], u)} "
                   f"({r['requested'] / ckpt_bytes:.2f}) | {_gb(r['rchar'], u)} | {_gb(r['device_read'], u)} |")
    return "\n".join(out)


def _order(loader: str) -> int:
    names = list(LOADERS)
    return names.index(loader) if loader in names else len(names)


def plot_vs_n(rows: list[dict], checkpoint: str, path: str) -> None:
    """Time (min) and summed PSS against N, one line per loader (warm runs of one checkpoint)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    mine = [r for r in rows if r["checkpoint"] == checkpoint and r["mode"] == "warm"]
    for loader in sorted({r["loader"] for r in mine}, key=_order):
        pts = sorted((r["world"], r["min_s"], r["pss_sum"] / GBF) for r in mine if r["loader"] == loader)
        style = "-" if loader.startswith("wc_") else "--"
        width = 2.5 if loader.startswith("wc_") else 1.2
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", lw=width, label=loader)
        ax_m.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", lw=width, label=loader)
    for ax, what in ((ax_t, "wall seconds (min of trials)"), (ax_m, "summed PSS over ranks, GB")):
        ax.set_xlabel("local ranks N")
        ax.set_ylabel(what)
        ax.set_xticks(sorted({r["world"] for r in mine}))
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{checkpoint}, warm page cache")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_timeline(report: dict, path: str) -> None:
    """The per-rank phase timeline of one weightcast load (its gathered report)."""
    from weightcast.workers.report import LoadReport, plot_timeline as draw
    draw([LoadReport(**r) for r in report["ranks"]], path)
