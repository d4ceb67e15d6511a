"""``python -m benchmarks.cluster_emu.sweep``: the emulated sweep of BENCHMARKS.md in one command
(root): several (node counts, link and storage rates) settings, each one run of
:mod:`benchmarks.cluster_emu.run` into its own results folder, then one table with the speed-up
over per-rank ``from_pretrained``, measured against ``plan --simulate``, the machine's CPU use
and load average per setting.

Default settings: 2 and 4 nodes at 2 Gbit/s links and 250 MB/s storage; 4 nodes at 1 Gbit/s and
125 MB/s; 8 nodes at 0.5 Gbit/s and 62.5 MB/s (rates divided as N grows, so that the
emulation's CPU work per second, which grows with N, stays within this machine's cores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.cluster_emu import run

SETTINGS = (("2,4", 2.0, 250.0), ("4", 1.0, 125.0), ("8", 0.5, 62.5))


def folder_of(results: str, nodes: str, link: float, storage: float, loaders: str) -> str:
    return os.path.join(results, f"{nodes.replace(',', '-')}n-{link:g}gbit-{storage:g}mbps-"
                                 f"{loaders.replace(',', '-')}")


def run_setting(nodes: str, link: float, storage: float, loaders: str, trials: int,
                results: str) -> str:
    """One ``run`` of the emulated benchmark; -> its results folder."""
    out = folder_of(results, nodes, link, storage, loaders)
    argv = ["run", "--nodes", nodes, "--link-gbit", str(link), "--storage-mbps", str(storage),
            "--loaders", loaders, "--trials", str(trials), "--results", out]
    code = run.main(argv)
    if code:
        raise SystemExit(code)
    return out


def rows_of(folder: str) -> list[dict]:
    with open(os.path.join(folder, "emu-results.json")) as f:
        data = json.load(f)
    topo = data.get("topology", {})
    for row in data["rows"]:
        row["link_gbit"], row["storage_mbps"] = topo.get("link_gbit"), topo.get("storage_mbps")
    return data["rows"]


def table(rows: list[dict]) -> str:
    """The BENCHMARKS.md table: per setting and loader, time, speed-up, prediction, CPU."""
    base = {(r["nodes"], r["link_gbit"]): r["wall_min_s"] for r in rows
            if r.get("key") == "hf" and "error" not in r}
    lines = ["| nodes | links / storage | loader | time min / median (s) | x faster than "
             "from_pretrained (min) | predicted (s) | measured / predicted | storage (x ckpt) | "
             "machine CPU busy | load average |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["nodes"], -(r["link_gbit"] or 0), r["loader"])):
        setting = f"{r['link_gbit']:g} Gbit/s, {r['storage_mbps']:g} MB/s"
        if "error" in r:
            lines.append(f"| {r['nodes']} | {setting} | {r['loader']} | failed | | | | | | |")
            continue
        hf = base.get((r["nodes"], r["link_gbit"]))
        model = r.get("model_s")
        faster = "-" if not hf or r.get("key") == "hf" else f"{hf / r['wall_min_s']:.2f}"
        predicted = "-" if model is None else f"{model:.2f}"
        ratio = "-" if not model else f"{r['wall_min_s'] / model:.2f}"
        lines.append(
            f"| {r['nodes']} | {setting} | {r['loader']} | {r['wall_min_s']:.2f} / {r['wall_median_s']:.2f} | "
            f"{faster} | {predicted} | {ratio} | {r['storage_x']:.2f} | "
            f"{r.get('cpu_busy_frac', 0):.0%} | {r.get('loadavg_max') or 0:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=os.path.join(run.DATA_DIR, "sweep"))
    p.add_argument("--loaders", default="hf,wc-replicate,wc-tp,wc-auto")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--settings", default=";".join(f"{n}:{l:g}:{s:g}" for n, l, s in SETTINGS),
                   help="NODES:LINK_GBIT:STORAGE_MBPS[:LOADERS[:TRIALS]];... (NODES and LOADERS "
                        "comma-separated; LOADERS and TRIALS default to --loaders, --trials)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from --results")
    args = p.parse_args(argv)
    folders = []
    for item in args.settings.split(";"):
        nodes, link, storage, *rest = item.split(":")
        loaders = rest[0] if rest else args.loaders
        trials = int(rest[1]) if len(rest) > 1 else args.trials
        folder = folder_of(args.results, nodes, float(link), float(storage), loaders)
        if not args.table_only:
            run_setting(nodes, float(link), float(storage), loaders, trials, args.results)
        folders.append(folder)
    rows = [r for folder in folders if os.path.exists(os.path.join(folder, "emu-results.json"))
            for r in rows_of(folder)]
    text = table(rows)
    with open(os.path.join(args.results, "sweep.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
