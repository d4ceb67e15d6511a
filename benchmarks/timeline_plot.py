"""Per-rank timeline of one load: every read request, send and receive (from the load report's
``timeline``) and the phases, one lane group per rank. Run on the host after a benchmark:

    python -m benchmarks.timeline_plot RESULTS.json OUT.png [--loader KEY] [--trial N]

``RESULTS.json`` is an emulated sweep's ``emu-results.json`` (``--loader`` picks the loader,
``--nodes`` the node count), a per-loader ``<key>.json`` of one launch, or a load report
(``weightcast load --report FILE``). Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import sys

COLORS = {"read": "#1f77b4", "send": "#ff7f0e", "recv": "#2ca02c"}
# a send runs from its posting (bytes ready, previous send to that rank done) to its completion;
# a receive is posted up front, so it runs from the previous completion from that rank (or the
# posting) to its arrival: waiting included
LABELS = {"read": "read request", "send": "send", "recv": "receive (waiting included)"}
PHASE_COLORS = {"plan": "#bbbbbb", "views": "#9467bd", "materialize": "#8c564b"}


def rank_entries(data: dict, loader: str | None, nodes: str | None, trial: int) -> list[dict]:
    """The per-rank report entries (``phases``, ``timeline``) of one trial of one loader, or of a
    load report (``return_report=True``, ``weightcast load --report``)."""
    if "ranks" in data and "trials" not in data:  # a load report
        return sorted(data["ranks"], key=lambda r: r.get("rank", 0))
    if "runs" in data:  # a sweep's emu-results.json
        runs = data["runs"]
        run = runs[nodes] if nodes else next(iter(runs.values()))
        results = run["results"]
        result = results[loader] if loader else next(v for v in results.values() if "trials" in v)
    else:
        result = data
    ranks = result["trials"][trial]["ranks"]
    return sorted((r["report"] for r in ranks if isinstance(r.get("report"), dict)),
                  key=lambda r: r.get("rank", 0))


def plot(entries: list[dict], path: str, title: str = "") -> str:
    """Three lanes per rank (read, send, recv) over a band of the phases; -> ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.9 * len(entries)))
    labels, ticks = [], []
    for i, entry in enumerate(entries):
        base = i * 4
        for j, kind in enumerate(("read", "send", "recv")):
            y = base + 2.6 - 0.8 * j
            spans = [(e[0], max(e[1] - e[0], 1e-4)) for e in entry.get("timeline", {}).get(kind, [])]
            ax.broken_barh(spans, (y - 0.3, 0.6), color=COLORS[kind], label=LABELS[kind] if i == 0 else None)
            ticks.append(y)
            labels.append(f"rank {entry.get('rank', i)} {kind}")
        for phase, (a, b) in entry.get("phases", {}).items():
            if phase in PHASE_COLORS:
                ax.broken_barh([(a, max(b - a, 1e-4))], (base + 0.2, 0.5), color=PHASE_COLORS[phase],
                               label=phase if i == 0 else None)
        ticks.append(base + 0.45)
        labels.append(f"rank {entry.get('rank', i)} phases")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize="x-small")
    ax.set_xlabel("seconds since the load started")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper right", fontsize="x-small", ncol=6)
    if title:
        ax.set_title(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(entries: list[dict]) -> list[dict]:
    """Per rank: when its reads, sends and receives began and ended, bytes, and GB/s over that span."""
    out = []
    for entry in entries:
        row = {"rank": entry.get("rank")}
        for kind, events in entry.get("timeline", {}).items():
            if events:
                a, b = min(e[0] for e in events), max(e[1] for e in events)
                n = sum(e[2] for e in events)
                row[kind] = {"start": round(a, 3), "end": round(b, 3), "bytes": n,
                             "gbps": round(n / (b - a) / 1e9, 4) if b > a else None}
        row["phases"] = {k: [round(v[0], 3), round(v[1], 3)] for k, v in entry.get("phases", {}).items()}
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results")
    p.add_argument("out")
    p.add_argument("--loader", default=None, help="loader key in a sweep's results (e.g. wc-replicate)")
    p.add_argument("--nodes", default=None, help="node count in a sweep's results, e.g. 4n")
    p.add_argument("--trial", type=int, default=0)
    args = p.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    entries = rank_entries(data, args.loader, args.nodes, args.trial)
    if not any(e.get("timeline") for e in entries):
        print("no timeline in these results (loaded before timelines were recorded?)", file=sys.stderr)
        return 2
    plot(entries, args.out, f"{args.loader or ''} {args.nodes or ''} trial {args.trial}")
    for row in summary(entries):
        print(json.dumps(row))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
