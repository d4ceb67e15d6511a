"""The generated part of BENCHMARKS.md and the PNG plots of one run.

:func:`write` rewrites only what lies between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``
of an existing file (the prose around it, e.g. the analysis and the emulated-cluster section, is
kept); a new file gets the markers and an empty "Emulated cluster" heading. Called by
:func:`benchmarks.bench.write_outputs`.
"""
from __future__ import annotations

import os

from benchmarks import report, targets
from benchmarks.loaders import LOADERS

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GBF = 1e9


def plots(suite, rows: list[dict], directory: str) -> dict[str, str]:
    """Time / PSS vs N per checkpoint, and the timeline of one weightcast load (largest N)."""
    os.makedirs(directory, exist_ok=True)
    out = {}
    for name in suite.checkpoints:
        if any(r["checkpoint"] == name and r["mode"] == "warm" for r in rows):
            path = os.path.join(directory, f"{name}-vs-n.png")
            report.plot_vs_n(rows, name, path)
            out[f"plot_{name}"] = path
    first = next(iter(suite.checkpoints))
    timeline = [r for r in suite.records if r["checkpoint"] == first and r["mode"] == "warm"
                and r["loader"] == targets.WC and r.get("report")]
    if timeline:
        best = max(timeline, key=lambda r: (r["world"], -r["wall_s"]))
        path = os.path.join(directory, f"{first}-timeline-n{best['world']}.png")
        report.plot_timeline(best["report"], path)
        out["timeline"] = path
    return out


def _rel(path: str, md_path: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(md_path)))


def _machine(suite) -> list[str]:
    m, o = suite.machine, suite.options
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items() if val)
    la = lambda x: " / ".join(f"{a:.1f}" for a in x) if x else "?"  # noqa: E731
    return [f"- Command: `{o['command']}` (finished in {suite.seconds / 60:.1f} min)",
            f"- Date: {m['date']}",
            f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB RAM, Linux "
            f"{m['kernel']}, Python {m['python']}",
            f"- Versions: {v}",
            f"- Load average (1/5/15 min) at start {la(m['loadavg_start'])}, at end {la(m.get('loadavg_end'))} "
            "(the machine is shared: other processes ran during the measurements)",
            f"- Trials: {o['trials']} per loader and N (warm), {o['cold_trials']} cold; min and median reported"]


def _checkpoints(suite) -> list[str]:
    out = ["| checkpoint | tensor bytes | files | tensors | path |", "|---|---|---|---|---|"]
    for name, c in suite.checkpoints.items():
        out.append(f"| {name} | {c['bytes']:,} | {c['files']} | {c['tensors']} | `{c['path']}` |")
    return out


def _physical(suite) -> list[str]:
    p = suite.physical
    if not p:
        return ["Not measured in this run."]
    gloo = f"{p['gloo_gbps']:.2f}" if p.get("gloo_gbps") else "not measured"
    return ["| cold read (8 MiB preadv, 2 threads) | warm read | private map + touch one byte per page | "
            "memcpy | first touch (4 KiB pages) | gloo send/recv, 2 local ranks |",
            "|---|---|---|---|---|---|",
            f"| {p['cold_read_gbps']:.2f} GB/s | {p['warm_read_gbps']:.2f} GB/s | {p['map_touch_gbps']:.2f} GB/s | "
            f"{p['memcpy_gbps']:.2f} GB/s | {p['first_touch_gbps']:.2f} GB/s | {gloo} GB/s |"]


def _targets(checks: list[dict]) -> list[str]:
    out = ["| target | checkpoint | mode | N | measured | limit | met |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        met = {True: "yes", False: "**no**", None: "n/a"}[c["met"]]
        out.append(f"| {c['target']} | {c['checkpoint']} | {c['mode']} | {c['world']} | {c['measured']} | "
                   f"{c['limit']} | {met} |")
    return out


def _not_run(suite) -> list[str]:
    items = [(f["checkpoint"], f.get("mode", ""), f["world"], f["loader"], "failed: " + f["error"].splitlines()[0]
              + (" (a rank was SIGKILLed: the kernel's OOM killer, when dmesg says so)"
                 if "SIGKILL" in f.get("detail", "") else "")) for f in suite.failures]
    items += [(s["checkpoint"], s["mode"], s["world"], s["loader"], "skipped: " + s["reason"]) for s in suite.skipped]
    if not items:
        return ["Every loader ran everywhere it was asked to."]
    out = ["| checkpoint | mode | N | loader | why |", "|---|---|---|---|---|"]
    out += [f"| {c} | {m} | {w} | {ldr} | {why[:300].replace('|', '/')} |" for c, m, w, ldr, why in items]
    return out


def _e2e(suite) -> list[str]:
    if not suite.e2e:
        return ["Not measured in this run."]
    out = ["| checkpoint | N | loader | trials | min s | median s | of which the load itself, median s |",
           "|---|---|---|---|---|---|---|"]
    keys = sorted({(e["checkpoint"], e["world"], e["loader"]) for e in suite.e2e})
    for ckpt, world, loader in keys:
        mine = [e for e in suite.e2e if (e["checkpoint"], e["world"], e["loader"]) == (ckpt, world, loader)]
        s = sorted(e["seconds"] for e in mine)
        load = sorted(e["load_s"] for e in mine)
        out.append(f"| {ckpt} | {world} | {LOADERS[loader].label} | {len(s)} | {s[0]:.2f} | "
                   f"{report._median(s):.2f} | {report._median(load):.2f} |")
    return out


def _simulate(suite, rows: list[dict]) -> list[str]:
    if not suite.simulate:
        return ["Not run."]
    out = ["| checkpoint | mode | N | device map | transport | predicted s | cost-model bound s | measured min s |",
           "|---|---|---|---|---|---|---|---|"]
    for s in suite.simulate:
        r = report.find(rows, s["checkpoint"], s["mode"], s["world"], f"wc_{s['device_map']}_{s['transport']}")
        if not r:
            continue
        measured = f"{r['min_s']:.2f}"
        if "predicted_seconds" in s:
            out.append(f"| {s['checkpoint']} | {s['mode']} | {s['world']} | {s['device_map']} | {s['transport']} | "
                       f"{s['predicted_seconds']:.3f} | {s['lower_bound_seconds']:.3f} | {measured} |")
        else:
            out.append(f"| {s['checkpoint']} | {s['mode']} | {s['world']} | {s['device_map']} | {s['transport']} | "
                       f"{s.get('error', '-')} | - | {measured} |")
    return out


def _gpu(suite) -> list[str]:
    g = suite.gpu
    if not g or not g.get("measured"):
        why = g["reason"] if g else "this run did not ask for them (`weightcast bench --gpu`)"
        return [f"**GPU figures are not measured**: {why}. No GPU number appears in this file."]
    lines = [f"Devices: {g['devices']}; page cache -> pinned -> one GPU: {g['h2d_one_gpu_gbps']:.2f} GB/s."]
    gpu_rows = report.summarize([{**r, "checkpoint": "gpu"} for r in g.get("records", [])])
    for r in gpu_rows:
        lines.append(f"- {LOADERS[r['loader']].label}, N={r['world']}: min {r['min_s']:.2f} s, "
                     f"median {r['median_s']:.2f} s")
    return lines


def generated(suite, rows: list[dict], md_path: str, files: dict[str, str]) -> str:
    """The markdown between the markers."""
    sizes = {n: c["bytes"] for n, c in suite.checkpoints.items()}
    lines = ["## Single machine", "", *_machine(suite), "", "### Checkpoints", "", *_checkpoints(suite), "",
             "### Targets", "", *_targets(targets.all_checks(rows, suite)), "",
             "### Physical limits measured here", "", *_physical(suite), ""]
    for name in suite.checkpoints:
        for mode in ("warm", "cold"):
            mine = [r for r in rows if r["checkpoint"] == name and r["mode"] == mode]
            if mine:
                lines += [f"### {name}, {mode} page cache", "", report.table(mine, sizes[name]), ""]
        if f"plot_{name}" in files:
            lines += [f"![{name}: time and summed PSS vs N]({_rel(files[f'plot_{name}'], md_path)})", ""]
    if "timeline" in files:
        lines += ["### One weightcast load, per rank", "",
                  f"![per-rank timeline]({_rel(files['timeline'], md_path)})", ""]
    lines += ["### End to end: torchrun launch to every rank loaded and touched", "", *_e2e(suite), "",
              "### `weightcast plan --simulate` with the bandwidths measured here", "", *_simulate(suite, rows), "",
              "### Loaders that could not run", "", *_not_run(suite), "", "### GPU", "", *_gpu(suite), ""]
    return "\n".join(lines)


def write(suite, rows: list[dict], path: str, files: dict[str, str]) -> str:
    """Write (or update between the markers) the markdown at ``path``; returns ``path``."""
    body = generated(suite, rows, path, files)
    if os.path.exists(path):
        with open(path) as fh:
            text = fh.read()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            text = f"{head}{BEGIN}\n{body}\n{END}{tail}"
        else:
            text = f"{text.rstrip()}\n\n{BEGIN}\n{body}\n{END}\n"
    else:
        text = (f"# Benchmarks\n\nThe tables between the markers are written by `{suite.options['command']}`.\n\n"
                f"{BEGIN}\n{body}\n{END}\n\n## Emulated cluster\n\nNot yet measured.\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return path
