"""Spawn N local ranks with the torchrun environment (tests, the demo, one machine).

:func:`spawn` starts ``python -m weightcast.launch.local RANK_FN ARGS_JSON`` once per rank with MASTER_ADDR,
MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE set (and WEIGHTCAST_NODE when node
names are given, to emulate several nodes on one machine). Each rank calls
``module:function(args)`` and writes its JSON-able return value to a result file. The parent
waits with a deadline: a rank that fails, hangs or dies makes :func:`spawn` kill the others and
raise, so nothing is left behind.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from weightcast.orchestrator.errors import LoadError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int
    value: object
    stderr: str


def rank_env(rank: int, world: int, port: int, nodes: list[str] | None, base: dict | None = None) -> dict[str, str]:
    """The torchrun environment of one local rank (nodes[rank] names its emulated node)."""
    env = dict(os.environ if base is None else base)
    node = nodes[rank] if nodes else None
    local_ranks = [r for r in range(world) if not nodes or nodes[r] == node]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_RANK=str(local_ranks.index(rank)), LOCAL_WORLD_SIZE=str(len(local_ranks)),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    if node:
        env["WEIGHTCAST_NODE"] = node
    return env


def spawn(nproc: int, fn: str, args: dict, *, timeout: float = 600.0, nodes: list[str] | None = None,
          env: dict | None = None, check: bool = True) -> list[RankResult]:
    """Run ``fn`` (``"module:function"``) on ``nproc`` local ranks; return every rank's result.

    With ``check`` a failing rank raises LoadError carrying its stderr tail.
    """
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="weightcast-spawn-")
    procs, errs = [], []
    for rank in range(nproc):
        out = os.path.join(tmp, f"rank{rank}.json")
        err = open(os.path.join(tmp, f"rank{rank}.err"), "w+")
        cmd = [sys.executable, "-m", "weightcast.launch.local", fn, json.dumps(args), out]
        procs.append(subprocess.Popen(cmd, env=rank_env(rank, nproc, port, nodes, env), stderr=err,
                                      start_new_session=True))
        errs.append(err)
    try:
        _wait(procs, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    results = []
    for rank, (p, err) in enumerate(zip(procs, errs)):
        err.seek(0)
        text = err.read()
        err.close()
        path = os.path.join(tmp, f"rank{rank}.json")
        value = json.load(open(path)) if os.path.exists(path) else None
        results.append(RankResult(rank, p.returncode, value, text))
    if check:
        bad = [r for r in results if r.returncode != 0]
        if bad:
            r = bad[0]
            if isinstance(r.value, dict) and "error" in r.value:
                raise LoadError.from_message(r.value["type"], r.value["error"])
            raise LoadError(f"Rank {r.rank} of the local job failed (exit status {r.returncode})",
                            where=f"local rank {r.rank}", got=r.stderr.strip()[-3000:] or "no output")
    return results


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every rank; after the first failure the others get a grace period, then die."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            return
        if any(p.returncode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + 30)
        time.sleep(0.05)


def _main(argv: list[str]) -> int:
    from weightcast.orchestrator.errors import WeightcastError
    fn, args, out = argv[0], json.loads(argv[1]), argv[2]
    module, name = fn.split(":")
    status = 0
    try:
        value = getattr(importlib.import_module(module), name)(args)
    except WeightcastError as exc:  # the same clear error on every rank: no traceback
        print(f"rank {os.environ.get('RANK')}: {type(exc).__name__}: {exc}", file=sys.stderr)
        value, status = {"error": str(exc), "type": type(exc).__name__}, 2
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(value, fh)
    os.replace(tmp, out)
    return status


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
