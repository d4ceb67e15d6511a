"""``python -m benchmarks.cluster_emu.run [run|up|down|configs] ...``: the emulated-cluster
benchmark (``make emu-bench``; ``weightcast emulate`` wraps it). Needs root.

``run`` (the default): for each node count, bring the cluster up, run every loader's cold
trials in one torchrun launch per node, take the cost model's prediction, tear the cluster
down; print the table and write ``RESULTS/emu-results.{json,md,png}``. ``up`` / ``down`` leave a
cluster up for manual experiments / remove everything the emulation made. ``configs`` writes
``cluster_configs/emu-Nn.yaml`` for the default topology. Ctrl-C and SIGTERM tear down too.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict

from benchmarks.cluster_emu import ckpt, harness, report
from benchmarks.cluster_emu.loaders import DEFAULT_KEYS, LOADERS, unavailable
from benchmarks.cluster_emu.storage import REPO_ROOT
from benchmarks.cluster_emu.topology import DEFAULT_WORKDIR, EmulationError, Topology, cluster_yaml

DATA_DIR = os.path.join(REPO_ROOT, "bench_data", "cluster_emu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every sub-command (also used by ``weightcast emulate``)."""
    p.add_argument("--nodes", default="2,4", help="node counts of the sweep (up: one count)")
    p.add_argument("--ranks-per-node", type=int, default=1)
    p.add_argument("--link-gbit", type=float, default=2.0, help="per link and direction")
    p.add_argument("--storage-mbps", type=float, default=250.0, help="aggregate storage cap")
    p.add_argument("--read-ahead-kb", type=int, default=1024, help="storage client read-ahead")
    p.add_argument("--loaders", default=",".join(DEFAULT_KEYS),
                   help=f"comma-separated, among {', '.join(LOADERS)}")
    p.add_argument("--trials", type=int, default=3, help="cold trials per loader (>= 3 for a median)")
    p.add_argument("--checkpoint", default="emu-1g", help="emu-1g | llama-1b | tiny")
    p.add_argument("--data-dir", default=DATA_DIR, help="checkpoint and results live here")
    p.add_argument("--results", default=None, help="results directory (default DATA_DIR/results)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="mounts and state of the emulation")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per launch")
    p.add_argument("--configs-dir", default=os.path.join(REPO_ROOT, "cluster_configs"))


def topology(args: argparse.Namespace, nodes: int) -> Topology:
    return Topology(nodes=nodes, ranks_per_node=args.ranks_per_node, link_gbit=args.link_gbit,
                    storage_mbps=args.storage_mbps, workdir=args.workdir,
                    read_ahead_kb=args.read_ahead_kb)


def node_counts(args: argparse.Namespace) -> list[int]:
    try:
        return [int(n) for n in str(args.nodes).split(",") if n]
    except ValueError:
        raise EmulationError(f"--nodes takes comma-separated integers, got {args.nodes!r}") from None


def cmd_configs(args: argparse.Namespace) -> int:
    """Write the cluster YAML of each node count into ``--configs-dir``."""
    for n in node_counts(args):
        path = os.path.join(args.configs_dir, f"emu-{n}n.yaml")
        with open(path, "w") as f:
            f.write(cluster_yaml(topology(args, n)))
        print(path)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    topo = topology(args, node_counts(args)[0])
    src = ckpt.make_checkpoint(os.path.join(args.data_dir, args.checkpoint), args.checkpoint)
    harness.cluster_up(topo, src)
    print(f"{topo.nodes} nodes up: {', '.join(topo.node_names)} "
          f"({', '.join(topo.addr(k) for k in range(topo.nodes))}), links {topo.link_gbit:g} Gbit/s, "
          f"storage {topo.storage_mbps:g} MB/s at {topo.mountpoint}/<node>.\n"
          f"Run in a node: ip netns exec {topo.node_names[0]} sh -c 'mount --bind "
          f"{topo.view(topo.node_names[0])} {topo.ckpt_path} && exec CMD'\n"
          f"Counters: cat {topo.stats_path}. Tear down: python -m benchmarks.cluster_emu.run down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    removed = harness.cluster_down(topology(args, 1))
    print("removed: " + (", ".join(removed) if removed else "nothing (already clean)"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    keys = [k for k in args.loaders.split(",") if k]
    unknown = [k for k in keys if k not in LOADERS]
    if unknown or args.trials < 1:
        raise EmulationError(f"unknown loaders {unknown} (known: {', '.join(LOADERS)})" if unknown
                             else "--trials must be >= 1")
    results_dir = args.results or os.path.join(args.data_dir, "results")
    os.makedirs(results_dir, exist_ok=True)
    src = ckpt.make_checkpoint(os.path.join(args.data_dir, args.checkpoint), args.checkpoint)
    size = ckpt.checkpoint_bytes(src)
    rows: list[dict] = []
    data = {"checkpoint": args.checkpoint, "checkpoint_bytes": size, "runs": {}}
    out = os.path.join(results_dir, "emu-results")
    for n in node_counts(args):
        topo = topology(args, n)
        data["topology"] = {k: v for k, v in asdict(topo).items() if k != "nodes"}
        print(f"== {n} nodes x {topo.ranks_per_node} ranks: links {topo.link_gbit:g} Gbit/s, "
              f"storage {topo.storage_mbps:g} MB/s, checkpoint {size / 1e9:.2f} GB", flush=True)
        rows += sweep_one(topo, keys, src, size, results_dir, args, data)
        report.write_results(out, data, rows)
    print(report.markdown_table(rows))
    png = report.plot(out + ".png", rows)
    print(f"results: {out}.json, {out}.md" + (f", {png}" if png else ""))
    return 0


def sweep_one(topo: Topology, keys: list[str], src: str, size: int, results_dir: str,
              args: argparse.Namespace, data: dict) -> list[dict]:
    """Up, every loader, predictions, down (always) for one node count; -> table rows."""
    yaml_path = os.path.join(results_dir, f"emu-{topo.nodes}n.yaml")
    with open(yaml_path, "w") as f:
        f.write(cluster_yaml(topo))
    out_dir = os.path.join(results_dir, f"{topo.nodes}n")
    t0 = time.monotonic()
    results = {k: {"error": f"skipped: {unavailable(LOADERS[k])}"} for k in keys
               if unavailable(LOADERS[k])}
    try:
        harness.cluster_up(topo, src)
        results.update(harness.run_loaders(
            topo, [k for k in keys if k not in results], out_dir, trials=args.trials,
            cluster_yaml=yaml_path, port=topo.rdzv_port, timeout=args.timeout))
    finally:
        harness.cluster_down(topo)
    rows = []
    for key in keys:
        row = report.summarize(key, results[key], topo, size)
        spec = LOADERS[key]
        if spec.device_map is not None:
            pred = report.predict(src, yaml_path, spec.device_map)
            row["prediction"] = pred
            row["model_s"] = pred.get("predicted_s")
        else:
            row["model_s"] = report.baseline_model(key, topo, size)
        rows.append(row)
        if "error" not in row:
            print(f"  {spec.label:<22} {row['wall_median_s']:7.2f} s  storage {row['storage_x']:.2f}x"
                  f"  links {row['link_bytes'] / 1e9:.2f} GB  (load average up to "
                  f"{row['loadavg_max'] or 0:.1f}, machine CPU busy {row['cpu_busy_frac']:.0%}, "
                  f"ranks' CPU {row['rank_cpu_s']:.1f} s)", flush=True)
    data["runs"][f"{topo.nodes}n"] = {"results": results, "seconds": time.monotonic() - t0}
    return rows


COMMANDS = {"run": cmd_run, "up": cmd_up, "down": cmd_down, "configs": cmd_configs}


def _terminate(signum, frame):  # SIGTERM / SIGHUP: unwind through the finally blocks
    raise KeyboardInterrupt(f"signal {signum}")


def execute(command: str, args: argparse.Namespace) -> int:
    """Run one sub-command; errors become a message and exit status 2, Ctrl-C / SIGTERM a
    tear-down and 130. Called by :func:`main` and by ``weightcast emulate``."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        return COMMANDS[command](args)
    except EmulationError as exc:
        print(f"emulate {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        harness.cluster_down(topology(args, 1))
        print(f"emulate {command}: interrupted; the emulated cluster was torn down",
              file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.cluster_emu.run {command}",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return execute(command, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
