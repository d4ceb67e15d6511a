"""Spawn N local ranks with the torchrun environment (tests, the demo, one machine).

:func:`spawn` starts ``python -m weightcast.launch.local RANK_FN ARGS_JSON OUT PHASE`` once per rank
with MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE set (and
WEIGHTCAST_NODE when node names are given, to emulate several nodes on one machine). Each rank
calls ``module:function(args)``, writes its JSON-able return value to a result file, and keeps its
current phase (``start-up``, ``plan``, ``transfer``, ``materialize``...) in a phase file.

The parent reaps every child as it exits. The first rank that dies or fails is noticed at once
(within :data:`POLL_S`); the others get ``grace`` seconds to fail by themselves (they detect the
lost peer and clean up), then are stopped (SIGTERM, then SIGKILL). The error names the first
rank that failed, its exit status or signal and its last phase. Ctrl-C or SIGTERM of the parent
stops every rank the same way (SIGTERM, which a rank handles as Ctrl-C: its load fails on every
rank and cleans up; SIGKILL after :data:`STOP_S`) and raises ``KeyboardInterrupt``
(:class:`~weightcast.launch.interrupts.Terminated` for SIGTERM). Nothing is left behind: no
process, no ``$TMPDIR/weightcast-spawn-*`` directory, no staging area of a killed rank.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from weightcast.orchestrator.errors import ConfigError, LoadError

POLL_S = 0.02
"""How often the parent looks at its children."""

STOP_S = 5.0
"""Seconds the ranks get after SIGTERM (to fail together and remove what they staged) before
SIGKILL, when the launcher itself is interrupted."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_local_ranks() -> int:
    """The most local ranks :func:`spawn` starts: 4 per CPU core (at least 8), at most 1024."""
    return min(1024, max(8, 4 * (os.cpu_count() or 1)))


def check_nproc(nproc: object, what: str = "--nproc") -> int:
    """``nproc`` as an int in 1..:func:`max_local_ranks`, else ConfigError naming ``what``."""
    limit = max_local_ranks()
    if type(nproc) is not int or not 1 <= nproc <= limit:
        raise ConfigError(f"Invalid number of local ranks {what}", expected=f"an integer from 1 to {limit} "
                          f"(4 per CPU core on this machine, {os.cpu_count()} cores)", got=repr(nproc),
                          fix="pass a smaller --nproc; use torchrun or Ray to run more ranks across machines")
    return nproc


@dataclass
class RankResult:
    """One rank's end: ``returncode`` (negative: killed by that signal), its return value (None if
    it wrote none), its stderr, its last phase, and whether the launcher itself stopped it."""
    rank: int
    returncode: int
    value: object
    stderr: str
    phase: str = ""
    stopped: bool = False


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
          env: dict | None = None, check: bool = True, grace: float = 3.0,
          start: Callable[..., Any] | None = None) -> list[RankResult]:
    """Run ``fn`` (``"module:function"``) on ``nproc`` local ranks; return every rank's result.

    Called by one process (the CLI, a test). ``timeout``: seconds for the whole job; ``grace``:
    seconds the other ranks get to end by themselves after the first failure. With ``check`` a
    failure raises: the rank's own WeightcastError when it reported one, else a LoadError naming
    the first rank that died, its signal or exit status and its last phase, with its stderr tail.
    ``start(tmp, rank, fn, args, env)`` starts one rank and returns its process (a seam for tests,
    which fork ranks from a process that has imported torch once; default: a new interpreter
    running :func:`_main` in its own session, stderr to ``tmp/rank{rank}.err``).
    """
    check_nproc(nproc, "nproc")
    if nodes is not None and len(nodes) != nproc:
        raise ConfigError("One node name per rank is needed", expected=f"{nproc} names", got=len(nodes))
    from weightcast.launch.interrupts import interrupts_ignored, interrupts_raise
    tmp = tempfile.mkdtemp(prefix="weightcast-spawn-")
    procs: list[subprocess.Popen] = []
    try:
        with interrupts_raise():  # Ctrl-C and SIGTERM: stop the ranks below, then re-raise
            port = free_port()
            for rank in range(nproc):
                procs.append((start or _start)(tmp, rank, fn, args, rank_env(rank, nproc, port, nodes, env)))
            stopped = _wait(procs, timeout, grace, lambda rank: _phase(tmp, rank))
        results = [_result(tmp, rank, p, rank in stopped) for rank, p in enumerate(procs)]
    finally:
        with interrupts_ignored():  # a second Ctrl-C must not leave ranks running
            stop_process_groups(procs, STOP_S)
            if any(p.returncode is None or p.returncode < 0 for p in procs):
                _reclaim_staging()  # areas a killed rank held: no live process holds them any more
            shutil.rmtree(tmp, ignore_errors=True)
    if check:
        _raise_first_failure(results)
    return results


def _start(tmp: str, rank: int, fn: str, args: dict, env: dict[str, str]) -> subprocess.Popen:
    out, phase = os.path.join(tmp, f"rank{rank}.json"), os.path.join(tmp, f"rank{rank}.phase")
    with open(os.path.join(tmp, f"rank{rank}.err"), "w") as err:
        cmd = [sys.executable, "-m", "weightcast.launch.local", fn, json.dumps(args), out, phase]
        return subprocess.Popen(cmd, env=env, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)


def _wait(procs: list[subprocess.Popen], timeout: float, grace: float, phase_of: Callable[[int], str]) -> set[int]:
    """Reap the ranks as they exit. After the first failure (or at ``timeout``) the others get
    ``grace`` seconds (none at the timeout), then are stopped: SIGKILL at once for those still in
    ``start-up`` (waiting in the rendezvous, where they cannot act on SIGTERM, with nothing to
    clean up yet), SIGTERM first for the others; -> the ranks stopped here."""
    deadline = time.monotonic() + timeout
    failed = False
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return set()
        now = time.monotonic()
        if not failed and any(c not in (None, 0) for c in codes):
            failed, deadline = True, min(deadline, now + grace)
        if now >= deadline:
            alive = {r for r, c in enumerate(codes) if c is None}
            stop_process_groups([procs[r] for r in sorted(alive) if phase_of(r) == "start-up"], term_s=0.0)
            stop_process_groups(procs)
            return alive
        time.sleep(POLL_S)


def stop_process_groups(procs: list[subprocess.Popen], term_s: float = 1.0) -> None:
    """SIGTERM the process group of every live process (each started with
    ``start_new_session=True``), SIGKILL what is left after ``term_s``, reap all. Also used by the
    emulated-cluster benchmark harness for its node processes."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + term_s
        while any(p.poll() is None for p in live) and time.monotonic() < end:
            time.sleep(POLL_S)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL cannot end (D state)
            pass


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _phase(tmp: str, rank: int) -> str:
    """The rank's last phase as it wrote it (``start-up`` before it wrote one)."""
    return _read(os.path.join(tmp, f"rank{rank}.phase")).strip() or "start-up"


def _result(tmp: str, rank: int, p: subprocess.Popen, stopped: bool) -> RankResult:
    text = _read(os.path.join(tmp, f"rank{rank}.json"))
    value = json.loads(text) if text else None
    code = p.returncode if p.returncode is not None else -signal.SIGKILL
    return RankResult(rank, code, value, _read(os.path.join(tmp, f"rank{rank}.err")), _phase(tmp, rank), stopped)


def describe_exit(code: int) -> str:
    """``killed by SIGKILL`` / ``exit status 2``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _raise_first_failure(results: list[RankResult]) -> None:
    """Raise for the rank to blame: one killed by a signal the launcher did not send, else the
    first that reported an error, else the first that exited non-zero."""
    bad = [r for r in results if r.returncode != 0 and not r.stopped]
    if not bad:
        bad = [r for r in results if r.returncode != 0]
    if not bad:
        return
    killed = [r for r in bad if r.returncode < 0]
    reported = [r for r in bad if isinstance(r.value, dict) and "error" in r.value]
    if reported and not killed:
        raise LoadError.from_message(reported[0].value["type"], reported[0].value["error"])
    r = (killed or bad)[0]
    others = [o.rank for o in results if o.stopped]
    tail = f"; ranks {others} were then stopped" if others else ""
    raise LoadError(f"Rank {r.rank} of the local job was {describe_exit(r.returncode)} during {r.phase}{tail}",
                    where=f"local rank {r.rank}, last phase {r.phase}",
                    got=r.stderr.strip()[-3000:] or "no output",
                    fix="see the rank's output above; a SIGKILL is often the out-of-memory killer (dmesg)")


def _reclaim_staging() -> None:
    try:
        from weightcast.workers.staging_areas import reclaim_stale
        reclaim_stale()
    except (ImportError, OSError):  # pragma: no cover - staging unavailable here
        pass


def _phase_writer(path: str):
    """A listener writing each phase name to ``path`` (read by the parent when the rank dies)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(phase: str) -> None:
        data = phase.encode()[:200]
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    return write


def _main(argv: list[str]) -> int:
    from weightcast.launch.interrupts import describe, exit_status, interrupts_raise
    from weightcast.orchestrator.errors import WeightcastError
    from weightcast.workers.report import on_phase
    fn, args, out = argv[0], json.loads(argv[1]), argv[2]
    if len(argv) > 3:
        write = _phase_writer(argv[3])
        write("start-up")
        on_phase(write)
    module, name = fn.split(":")
    status = 0
    try:
        with interrupts_raise():  # SIGTERM from the launcher ends the load as Ctrl-C does: with its clean-up
            value = getattr(importlib.import_module(module), name)(args)
        if len(argv) > 3:
            write("exit")
    except WeightcastError as exc:  # the same clear error on every rank: no traceback
        print(f"rank {os.environ.get('RANK')}: {type(exc).__name__}: {exc}", file=sys.stderr)
        value, status = {"error": str(exc), "type": type(exc).__name__}, 2
    except KeyboardInterrupt as exc:
        print(f"rank {os.environ.get('RANK')}: {describe(exc)}", file=sys.stderr)
        value, status = {"error": describe(exc), "type": type(exc).__name__}, exit_status(exc)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(value, fh)
    os.replace(tmp, out)
    return status


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
