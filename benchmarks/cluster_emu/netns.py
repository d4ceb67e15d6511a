"""Nodes and links of the emulated cluster: network namespaces, a bridge, veth pairs, tbf.

Layout (every object lives inside namespaces this module creates; the host's own network is
never touched)::

    <prefix>sw   : bridge br0, ports p0..p{N-1} (switch side of each veth, tbf = node download)
    <prefix>nK   : lo, eth0 = node K's end of its veth, address .K+1 of the subnet (tbf = upload)

Called by the harness (:mod:`benchmarks.cluster_emu.run`) and the tests, as root. Setting up
first tears down whatever a previous run left with the same prefix, so both are idempotent.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

from benchmarks.cluster_emu.topology import EmulationError, Topology

TOOLS = {"ip": "iproute2", "tc": "iproute2", "fusermount3": "fuse3", "ping": "iputils-ping"}


def require_root() -> None:
    """Raise unless this process is root (namespaces, tc and FUSE mounts need it)."""
    if os.geteuid() != 0:
        raise EmulationError(
            "The emulated cluster needs root: it creates network namespaces (ip netns), shapes "
            "links (tc), mounts a FUSE file system and bind-mounts it inside each node. "
            "Run it as root, e.g. `sudo make emu-bench`.")


def missing_requirements() -> list[str]:
    """What this machine lacks to run the emulation (empty when everything is there)."""
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items()
               if shutil.which(tool) is None]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse (the kernel's FUSE device)")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: libfuse3.so not found
        missing.append(f"mfusepy with libfuse3 (pip install mfusepy; apt-get install fuse3 "
                       f"libfuse3-dev): {exc}")
    return missing


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command (no shell); on failure raise :class:`EmulationError` with its stderr."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"`{' '.join(args)}` did not finish in {timeout:g} s") from None
    if check and proc.returncode != 0:
        raise EmulationError(f"`{' '.join(args)}` failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def netns_exec(node: str) -> list[str]:
    """Command prefix running a program inside ``node``'s network namespace (and a fresh mount
    namespace, as ``ip netns exec`` makes one)."""
    return ["ip", "netns", "exec", node]


def our_namespaces(prefix: str) -> list[str]:
    """Existing namespaces whose name starts with ``prefix`` (what a previous run created)."""
    out = sh("ip", "-j", "netns", "list", check=False).stdout.strip()
    names = [item["name"] for item in json.loads(out)] if out else []
    return sorted(n for n in names if n.startswith(prefix))


def setup_network(topo: Topology) -> None:
    """Create the switch, the nodes, their links and rate limits (tearing down leftovers first)."""
    teardown_network(topo.prefix)
    sw = topo.switch
    sh("ip", "netns", "add", sw)
    sh("ip", "-n", sw, "link", "set", "lo", "up")
    sh("ip", "-n", sw, "link", "add", topo.bridge, "type", "bridge")
    sh("ip", "-n", sw, "link", "set", topo.bridge, "up")
    for k, node in enumerate(topo.node_names):
        port = topo.port(k)
        sh("ip", "netns", "add", node)
        sh("ip", "-n", node, "link", "set", "lo", "up")
        sh("ip", "link", "add", "eth0", "netns", node, "type", "veth", "peer", "name", port,
           "netns", sw)
        sh("ip", "-n", sw, "link", "set", port, "master", topo.bridge)
        sh("ip", "-n", sw, "link", "set", port, "up")
        sh("ip", "-n", node, "addr", "add", f"{topo.addr(k)}/{topo.prefixlen}", "dev", "eth0")
        sh("ip", "-n", node, "link", "set", "eth0", "up")
        for ns, dev in ((node, "eth0"), (sw, port)):
            shape_link(ns, dev, topo.link_gbit)


def shape_link(ns: str, dev: str, gbit: float) -> None:
    """tbf on ``dev``'s egress: ``gbit`` Gbit/s, a burst of ~1 ms of traffic (at least 64 KiB)."""
    rate_bytes = gbit * 1e9 / 8
    burst = max(65536, int(rate_bytes / 1000))
    sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{gbit * 1000:g}mbit",
       "burst", str(burst), "latency", "20ms")


def check_links(topo: Topology, timeout: float = 10) -> None:
    """Every node pings node 0 (and node 0 the last node); raise if a link is down."""
    deadline = time.monotonic() + timeout
    pairs = [(k, 0) for k in range(1, topo.nodes)] + ([(0, topo.nodes - 1)] if topo.nodes > 1 else [])
    for src, dst in pairs:
        while True:
            proc = sh(*netns_exec(topo.node_names[src]), "ping", "-c", "1", "-W", "1",
                      topo.addr(dst), check=False)
            if proc.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise EmulationError(f"Node {topo.node_names[src]} cannot reach "
                                     f"{topo.addr(dst)}: {proc.stdout.strip()[-200:]}")
            time.sleep(0.2)


def kill_namespace_processes(ns: str, grace: float = 3.0) -> list[int]:
    """Terminate (then kill) the processes still running inside ``ns`` (started by the
    emulation); -> their PIDs."""
    pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            time.sleep(0.05)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def teardown_network(prefix: str) -> list[str]:
    """Delete every namespace named ``prefix*`` after ending the processes inside; deleting a
    namespace deletes its veth ends, bridge and qdiscs. -> the namespaces deleted."""
    gone = []
    for ns in our_namespaces(prefix):
        kill_namespace_processes(ns)
        sh("ip", "netns", "del", ns, check=False)
        gone.append(ns)
    left = our_namespaces(prefix)
    if left:
        raise EmulationError(f"Could not delete network namespaces {left}; "
                             "see `ip netns pids NAME` for what still runs there")
    return gone


def link_counters(topo: Topology) -> dict[str, dict[str, int]]:
    """Bytes each node sent (``tx``) and received (``rx``) over its link, from the switch
    ports' counters (a port's rx is what its node sent)."""
    out = sh("ip", "-n", topo.switch, "-s", "-j", "link", "show").stdout
    ports = {item["ifname"]: item.get("stats64", item.get("stats", {})) for item in json.loads(out)}
    counters = {}
    for k, node in enumerate(topo.node_names):
        stats = ports.get(topo.port(k), {})
        counters[node] = {"tx": int(stats.get("rx", {}).get("bytes", 0)),
                          "rx": int(stats.get("tx", {}).get("bytes", 0))}
    return counters
