"""Bring the emulated cluster up and down, and run one loader on it with torchrun per node.

Called by :mod:`benchmarks.cluster_emu.run` (the CLI) and the tests, as root, single process:
:func:`cluster_up` -> any number of :func:`run_loader` -> :func:`cluster_down` (in a
``finally``; :func:`cluster_down` also cleans up after a run that died without it).

Each node runs ``torchrun --nnodes N --nproc-per-node K --rdzv-backend c10d`` in its network
namespace (``ip netns exec``, which also gives it a private mount namespace). Before torchrun
starts, that mount namespace gets the node's storage view bind-mounted at the path every node
uses for the checkpoint, and its own ``/dev/shm`` (a node's shared memory is its own).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from benchmarks.cluster_emu import netns, storage
from benchmarks.cluster_emu.loaders import LOADERS
from benchmarks.cluster_emu.topology import EmulationError, Topology
from weightcast.launch.local import stop_process_groups

REPO_ROOT = storage.REPO_ROOT


def cluster_up(topo: Topology, src: str, *, direct_io: bool = False) -> None:
    """Create the nodes, links and storage (tearing down leftovers first). Raises without root."""
    netns.require_root()
    missing = netns.missing_requirements()
    if missing:
        raise EmulationError("Missing for the emulated cluster: " + "; ".join(missing) +
                             ". Install them with benchmarks/cluster_emu/setup_deps.sh")
    cluster_down(topo)
    os.makedirs(topo.workdir, exist_ok=True)
    with open(topo.state_path, "w") as f:
        json.dump({"prefix": topo.prefix, "nodes": list(topo.node_names), "src": src,
                   "mountpoint": topo.mountpoint}, f)
    netns.setup_network(topo)
    netns.check_links(topo)
    storage.start_storage(topo, src, direct_io=direct_io)


def cluster_down(topo: Topology) -> list[str]:
    """Remove everything the emulation made under ``topo.prefix`` / ``topo.workdir``: rank
    processes, the storage mount and daemon, namespaces (with their veths, bridge and qdiscs).
    Idempotent. -> what was removed, for the log."""
    netns.require_root()
    removed = []
    for ns in netns.our_namespaces(topo.prefix):
        pids = netns.kill_namespace_processes(ns)
        if pids:
            removed.append(f"processes {pids} in {ns}")
    if storage.is_mounted(topo.mountpoint) or os.path.exists(os.path.join(topo.workdir, "storagefs.pid")):
        storage.stop_storage(topo)
        removed.append(f"storage mount {topo.mountpoint}")
    removed += [f"namespace {ns}" for ns in netns.teardown_network(topo.prefix)]
    for path in (topo.ckpt_path, topo.mountpoint):
        if os.path.isdir(path) and not storage.is_mounted(path):
            try:
                os.rmdir(path)
            except OSError:
                pass
    if os.path.exists(topo.state_path):
        os.unlink(topo.state_path)
    return removed


def node_command(topo: Topology, k: int, module: str, rank_args: list[str], port: int) -> list[str]:
    """The command that runs node k's ranks: mounts inside its namespace, then torchrun."""
    node = topo.node_names[k]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(topo.nodes),
                "--nproc-per-node", str(topo.ranks_per_node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{topo.addr(0)}:{port}", "--rdzv-id", f"emu{port}",
                "--rdzv-conf", f"is_host={1 if k == 0 else 0}", "--local-addr", topo.addr(k),
                "--max-restarts", "0", "-m", module, *rank_args]
    script = (f"mount --bind {shlex.quote(topo.view(node))} {shlex.quote(topo.ckpt_path)} && "
              "mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec \"$@\"")
    return [*netns.netns_exec(node), "sh", "-c", script, "sh", *torchrun]


def launch(topo: Topology, module: str, rank_args: list[str], *, log_stem: str, port: int,
           timeout: float) -> tuple[list[int], float]:
    """Start ``module`` under torchrun on every node (node 0 first: it hosts the rendezvous)
    and wait for all; -> (exit codes, seconds). A node failing or the timeout stops them all."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": REPO_ROOT}
    procs, logs = [], []
    start = time.monotonic()
    try:
        for k, node in enumerate(topo.node_names):
            log = open(f"{log_stem}-{node}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                node_command(topo, k, module, rank_args, port), cwd=REPO_ROOT, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**env, "WEIGHTCAST_NODE": node}))
            if k == 0:
                time.sleep(0.5)
        codes = _wait_all(procs, start + timeout)
    finally:
        stop_process_groups(procs, term_s=5)
        for log in logs:
            log.close()
    return codes, time.monotonic() - start


def run_loaders(topo: Topology, keys: list[str], out_dir: str, *, trials: int, cluster_yaml: str,
                port: int, timeout: float = 1200, extra_args: tuple[str, ...] = ()) -> dict[str, dict]:
    """Run the loaders ``keys`` (trials each) in one launch per attempt; a loader that fails is
    recorded as ``{"error": ...}`` and the launch is repeated for the loaders after it.
    ``extra_args`` go to every rank (e.g. ``--verify``).
    -> {key: results of rank 0 (or the error)}."""
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict] = {}
    pending = list(keys)
    attempt = 0
    while pending:
        for key in pending:
            for suffix in (".json", ".started"):
                if os.path.exists(os.path.join(out_dir, key + suffix)):
                    os.unlink(os.path.join(out_dir, key + suffix))
        rank_args = [topo.ckpt_path, "--out", out_dir, "--trials", str(trials),
                     "--mountpoint", topo.mountpoint, "--switch", topo.switch,
                     "--timeout", str(int(min(timeout, 600))), "--loaders", ",".join(pending),
                     "--cluster", cluster_yaml, *extra_args]
        stem = os.path.join(out_dir, f"launch{attempt}")
        codes, seconds = launch(topo, "benchmarks.cluster_emu.rank_main", rank_args,
                                log_stem=stem, port=port + attempt, timeout=timeout)
        for key in list(pending):
            path = os.path.join(out_dir, key + ".json")
            if os.path.exists(path):
                with open(path) as f:
                    results[key] = json.load(f)
                pending.remove(key)
        if pending:
            failed = pending.pop(0)
            results[failed] = {"error": f"exit codes {codes}", "log": _log_tail(stem, topo)}
            print(f"  {LOADERS[failed].label} failed on {topo.nodes} nodes (exit codes {codes}); "
                  f"logs: {stem}-*.log", flush=True)
        attempt += 1
    return results


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int]:
    """Wait for every node; a node failing stops the others (they would wait for it)."""
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes  # type: ignore[return-value]
        if any(c not in (None, 0) for c in codes):
            time.sleep(2)
            stop_process_groups(procs, term_s=5)
            return [p.wait() for p in procs]
        if time.monotonic() > deadline:
            stop_process_groups(procs, term_s=5)
            return [p.wait() for p in procs]
        time.sleep(0.1)


def _log_tail(stem: str, topo: Topology, lines: int = 12) -> str:
    out = []
    for node in topo.node_names:
        try:
            with open(f"{stem}-{node}.log", errors="replace") as f:
                text = f.read().splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"--- {node}\n" + "\n".join(text))
    return "\n".join(out)
