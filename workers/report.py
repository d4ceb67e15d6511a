"""LoadReport: what one rank read, received, owns, how long each phase took, its memory.

Each rank builds its report; :func:`gather_reports` (collective) brings them all to every rank so
rank 0 can print, save (JSON) and plot them (a per-rank timeline PNG, matplotlib optional).
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from weightcast.workers.collectives import all_gather_bytes
from weightcast.workers.group import Group


@dataclass
class LoadReport:
    rank: int
    node: str
    device: str
    transport: str
    read_bytes: int = 0
    recv_bytes: int = 0
    sent_bytes: int = 0
    cross_node_sent: int = 0
    cross_node_recv: int = 0
    staged_bytes: int = 0
    owned_bytes: int = 0
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # phase -> [start, end] seconds since load start
    timeline: dict = field(default_factory=dict)  # kind -> [[start, end, bytes, count], ...]
    peak_rss_bytes: int = 0
    pss_bytes: int | None = None      # None: not measured (report_memory=False)
    private_bytes: int | None = None
    unleased_files: dict = field(default_factory=dict)  # node-shared: file -> why no read lease guards it

    @property
    def gbps(self) -> float:
        return self.owned_bytes / self.seconds / 1e9 if self.seconds else 0.0


_PHASE_LISTENERS: list[Callable[[str], None]] = []


def on_phase(listener: Callable[[str], None]) -> None:
    """Call ``listener(name)`` whenever a load of this process starts a phase (a launcher uses it
    to name the phase a rank died in). Not collective; process-wide."""
    _PHASE_LISTENERS.append(listener)


class PhaseClock:
    """Records [start, end] of named phases relative to the load's start (and tells the
    :func:`on_phase` listeners)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.phases: dict[str, list[float]] = {}

    def start(self, name: str) -> None:
        self.phases[name] = [time.perf_counter() - self.t0, 0.0]
        for listener in _PHASE_LISTENERS:
            listener(name)

    def stop(self, name: str) -> None:
        self.phases[name][1] = time.perf_counter() - self.t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def memory_now() -> dict[str, int]:
    """This process's PSS, private bytes (from /proc/self/smaps_rollup) and peak RSS."""
    out = {"pss_bytes": 0, "private_bytes": 0,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/smaps_rollup") as fh:
            fields = {}
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
        out["pss_bytes"] = fields.get("Pss", 0)
        out["private_bytes"] = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    except OSError:
        pass
    return out


def gather_reports(group: Group, report: LoadReport) -> list[LoadReport]:
    """Every rank's report, in rank order (collective)."""
    blobs = all_gather_bytes(group, json.dumps(asdict(report)).encode())
    return [LoadReport(**json.loads(b)) for b in blobs]


def summary(reports: list[LoadReport], checkpoint_bytes: int, wall_seconds: float) -> dict:
    """The JSON report of a whole load (keys documented in the README)."""
    return {
        "checkpoint_bytes": checkpoint_bytes,
        "total_read_bytes": sum(r.read_bytes for r in reports),
        "wall_seconds": wall_seconds,
        "ranks": [asdict(r) for r in reports],
    }


def format_table(reports: list[LoadReport]) -> str:
    rows = ["rank  node            device   read MB   recv MB  owned MB  seconds  GB/s   PSS MB  priv MB"]
    for r in reports:
        rows.append(f"{r.rank:>4}  {r.node[:14]:<14}  {r.device:<7} {r.read_bytes / 1e6:>8.1f} {r.recv_bytes / 1e6:>9.1f}"
                    f" {r.owned_bytes / 1e6:>9.1f} {r.seconds:>8.3f} {r.gbps:>5.2f} {_mb(r.pss_bytes):>8}"
                    f" {_mb(r.private_bytes):>8}")
    return "\n".join(rows)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def plot_timeline(reports: list[LoadReport], path: str) -> None:
    """A PNG with one bar per rank and phase (read / move / materialize). Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"plan": "#999999", "read": "#1f77b4", "transfer": "#ff7f0e", "views": "#9467bd",
              "materialize": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(8, 1 + 0.4 * len(reports)))
    for r in reports:
        for phase, (a, b) in r.phases.items():
            ax.barh(r.rank, max(b - a, 1e-4), left=a, color=colors.get(phase, "#d62728"),
                    label=phase if r.rank == 0 else None)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("rank")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
