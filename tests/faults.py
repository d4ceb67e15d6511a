"""Fault injection for the reliability tests: hooks, readers and a fast multi-rank runner.

Injection points (``with weightcast.workers.testing.inject(phase_hook=..., reader_factory=...)``
around a load, or as ``"tests.faults:phase_hook"`` / ``"tests.faults:reader_factory"`` strings for
``weightcast.launch.jobs.load_job``) read what to do from environment variables, so one rank of a job can
be hit while the others run normally:

- ``WC_FAULT=kind@rank:phase`` for :func:`phase_hook` (``*`` for the rank: every rank); kinds:
  ``kill`` (SIGKILL itself), ``raise`` (a RuntimeError), ``interrupt`` (KeyboardInterrupt),
  ``kill-on-send`` / ``kill-on-recv`` (SIGKILL itself at its first data collective / receive of
  the transfer phase), ``raise-on-send`` (a RuntimeError at its first data send of the transfer
  phase, its receives posted), ``rewrite`` / ``truncate`` (the
  rank rewrites / truncates ``WC_FAULT_FILE`` after planning; every rank then waits at a
  barrier so nobody reads before).
- ``WC_FAULT=stop@rank:phase``: the rank SIGSTOPs itself (alive, silent).
- ``WC_FAULT=truncate@rank:phase`` truncates to ``WC_TRUNCATE_TO`` bytes when set;
  ``rewrite-same`` / ``replace`` flip a byte in place / through a rename, restoring size and mtime.
  The change is made by a writer process (:func:`tests.file_writers.start_writer`): the load's read leases make
  a truncation or an open for writing wait, so the rank goes on once the writer finished or
  is blocked by a lease of its own.
- ``WC_FAULT=writer-truncate@rank:phase`` / ``writer-open@rank:phase``: the same writer
  (``os.truncate`` to ``WC_TRUNCATE_TO``, or ``open(path, "r+b")`` and one byte flipped),
  without the barrier: only that rank waits for it (e.g. at ``materialize-checked``, the
  moment between the file guard's checks and the first touch of the mapped pages).
  ``writer-truncate-done``: every rank then waits there until the truncation happened (as
  steps touching mapped pages for longer than the kernel's lease-break-time would).
- ``WC_NO_LEASES=1``: :func:`load_scenario` turns the file leases off (what they prevent).
- ``WC_READ=kind@rank`` for :func:`reader_factory`; kinds in :class:`FaultReader`.
  ``WC_SLOW_READ=seconds``: every rank sleeps that long before each read (slow storage).
  ``WC_READ_LOG``: a file every read is appended to as a JSON line ``[rank, file, offset, length]``.
- ``WC_MARK``: a directory; a rank about to die writes ``death.json`` there (its rank,
  ``time.time()`` and its open staging areas), so tests can measure the time from a death to
  each survivor's error.

:func:`run_ranks` runs a scenario function on N local ranks forked from a forkserver that has
imported torch once (a rank starts in milliseconds instead of seconds), either letting
weightcast create the process group from the torchrun environment or creating it first, as a
user script does (``dist.init_process_group`` with its default 30-minute timeout).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from tests.file_writers import _WRITERS, start_writer, wait_writers


# ------------------------------------------------------------------ environment-driven faults


def _spec(var: str) -> tuple[str, int, str] | None:
    """``kind@rank[:phase]`` from the environment -> (kind, rank, phase)."""
    text = os.environ.get(var)
    if not text:
        return None
    kind, _, where = text.partition("@")
    rank, _, phase = where.partition(":")
    return kind, -1 if rank == "*" else int(rank), phase


def _my_rank() -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def mark_death(rank: int) -> None:
    """Write ``WC_MARK/death.json``: rank, wall time and the staging areas this process holds."""
    mark = os.environ.get("WC_MARK")
    if mark:  # several threads may die at once: each writes its own file, then renames it
        tmp = os.path.join(mark, f".death-{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "w") as fh:
            json.dump({"rank": rank, "time": time.time(), "areas": open_shm_areas()}, fh)
        os.replace(tmp, os.path.join(mark, "death.json"))


def open_shm_areas() -> list[str]:
    """Paths of ``/dev/shm/weightcast-*`` staging areas this process has open or mapped."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as fh:
        found.update(line.split(None, 5)[-1].strip() for line in fh if "/dev/shm/weightcast-" in line)
    return sorted(p for p in found if p.startswith("/dev/shm/weightcast-"))


def die(rank: int) -> None:
    mark_death(rank)
    os.kill(os.getpid(), signal.SIGKILL)


def phase_hook(phase: str, rank: int) -> None:
    """The phase hook (``workers.testing.inject``): apply ``WC_FAULT`` when it names this rank and phase."""
    spec = _spec("WC_FAULT")
    if spec is None:
        return
    kind, target, at = spec
    if kind in ("rewrite", "truncate", "rewrite-same", "replace") and phase == at:
        _change_file_then_barrier(kind, rank == target)
        return
    if kind in ("writer-truncate", "writer-open") and (rank, phase) == (target, at):
        start_writer(kind.split("-")[1], os.environ["WC_FAULT_FILE"])
        return
    if kind == "writer-truncate-done" and phase == at:  # every rank's touch step outlasts the lease
        if rank == target:
            start_writer("truncate", os.environ["WC_FAULT_FILE"])
        _wait_for_size(os.environ["WC_FAULT_FILE"], int(os.environ.get("WC_TRUNCATE_TO", "0")))
        return
    if target not in (-1, rank) or phase != at:
        return
    if kind == "kill":
        die(rank)
    elif kind == "stop":  # SIGSTOP itself: alive but silent (the test SIGKILLs it afterwards)
        mark_death(rank)
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "raise":
        mark_death(rank)
        raise RuntimeError(f"injected failure on rank {rank} in phase {phase}")
    elif kind == "interrupt":
        mark_death(rank)
        raise KeyboardInterrupt
    elif kind in ("kill-on-send", "kill-on-recv", "raise-on-send"):
        _break_data_collectives(rank, kind)


def _wait_for_size(path: str, size: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.getsize(path) != size and time.monotonic() < deadline:
        time.sleep(0.01)


def _break_data_collectives(rank: int, kind: str) -> None:
    """Replace torch.distributed's data collectives in this process (the transfer phase calls
    them through the module): ``kill-on-send`` SIGKILLs the rank at any of them, ``kill-on-recv``
    at a receive, ``raise-on-send`` raises at a send, its receives posted (with rank ``*`` every
    rank fails so, each waiting on a peer that fails too)."""
    import torch.distributed as dist

    def broken(*args: Any, **kwargs: Any) -> None:
        if kind != "raise-on-send":
            die(rank)
        mark_death(rank)
        raise RuntimeError(f"injected failure on rank {rank} at a send")

    names = {"kill-on-recv": ("irecv", "recv"), "raise-on-send": ("isend", "send")}
    for name in names.get(kind, ("broadcast", "isend", "irecv", "send", "recv")):
        setattr(dist, name, broken)


def _change_file_then_barrier(kind: str, mine: bool) -> None:
    """One rank rewrites (same size, new mtime) or truncates ``WC_FAULT_FILE`` through a writer
    process; then all wait."""
    import torch.distributed as dist
    if mine:
        start_writer(kind, os.environ["WC_FAULT_FILE"])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class FaultReader:
    """Wraps a reader: logs every request (``WC_READ_LOG``) and applies ``WC_READ`` on its rank.

    ``short``, ``eof`` and ``eio`` act below the FileReader, on ``os.preadv`` (so its own
    handling is what is tested): ``short`` returns half of what each call asks for (a partial
    read the reader must complete), ``eof`` returns 0 (the file ended early), ``eio`` raises
    OSError(EIO). ``kill`` SIGKILLs the rank at its first read; ``slow`` sleeps ``WC_READ_DELAY``.
    """

    def __init__(self, inner: Any, rank: int) -> None:
        self.inner, self.rank = inner, rank
        spec = _spec("WC_READ")
        self.kind = spec[0] if spec is not None and spec[1] == rank else None
        self.delay = float(os.environ.get("WC_READ_DELAY", "0"))
        self.log = os.environ.get("WC_READ_LOG")
        self._real_preadv = None
        if self.kind in ("short", "eof", "eio"):
            self._real_preadv = os.preadv
            os.preadv = self._preadv

    def _preadv(self, fd: int, buffers: list, offset: int) -> int:
        if self.kind == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if self.kind == "eof":
            return 0
        view = memoryview(buffers[0]).cast("B")
        return self._real_preadv(fd, [view[:max(1, len(view) // 2)]], offset)

    @property
    def bytes_read(self) -> int:
        return self.inner.bytes_read

    def read_into(self, file: str, offset: int, dest: memoryview) -> None:
        view = memoryview(dest).cast("B")
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(json.dumps([self.rank, file, offset, len(view)]) + "\n")
        if self.kind == "kill":
            die(self.rank)
        if self.kind == "slow":
            time.sleep(self.delay)
        if os.environ.get("WC_SLOW_READ"):  # every rank's storage is slow
            time.sleep(float(os.environ["WC_SLOW_READ"]))
        self.inner.read_into(file, offset, view)

    def close(self) -> None:
        if self._real_preadv is not None:
            os.preadv = self._real_preadv
        self.inner.close()


def reader_factory(root: str, stamps: Any) -> FaultReader:
    """The reader factory (``workers.testing.inject``): the real FileReader wrapped by :class:`FaultReader`."""
    from weightcast.workers.reader import FileReader
    return FaultReader(FileReader(root, stamps), _my_rank())


def timed_load_job(args: dict) -> dict:
    """``weightcast.launch.jobs.load_job`` that records when this rank's error was raised (``WC_MARK``).
    ``WC_KILL_AT_START=rank``: that rank SIGKILLs itself first, before joining the process group."""
    from weightcast.launch.jobs import load_job
    if os.environ.get("WC_KILL_AT_START") == os.environ.get("RANK"):
        die(int(os.environ["RANK"]))
    try:
        return load_job(args)
    except BaseException:
        _record_error_time()
        raise


def _record_error_time() -> None:
    mark = os.environ.get("WC_MARK")
    if mark:
        with open(os.path.join(mark, f"error-{_my_rank()}.json"), "w") as fh:
            json.dump({"time": time.time()}, fh)


# ------------------------------------------------------------------ forked ranks


@dataclass
class Outcome:
    """What one rank did: ``value`` is the scenario's return value, or ``error``/``error_type``
    of what it raised; ``t_error`` the wall time it raised at; ``exitcode`` as multiprocessing
    reports it (-9: SIGKILLed)."""
    rank: int
    pid: int
    exitcode: int | None
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    t_error: float | None = None
    writers: list | None = None  # the writer processes it started (wait_writers)


def _context() -> Any:
    from tests.ranks import forkserver
    return forkserver()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(nproc: int, scenario: Callable[[dict], Any], args: dict, *, env: dict[str, str] | None = None,
              user_group: bool = False, timeout: float = 60.0, nodes: list[str] | None = None
              ) -> list[Outcome]:
    """Run ``scenario(args)`` on ``nproc`` forked local ranks and return each rank's Outcome.

    ``user_group``: each rank calls ``dist.init_process_group("gloo")`` itself (default
    timeout) before the scenario; else weightcast creates it from the torchrun environment.
    Ranks still alive after ``timeout`` seconds are killed (their Outcome has exitcode -9 and
    no value): a test asserting clean exits then fails.
    """
    ctx = _context()
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="weightcast-faults-")
    procs = []
    for rank in range(nproc):
        out = os.path.join(tmp, f"rank{rank}.json")
        rank_env = dict(env or {}, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                        WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
        if nodes:
            rank_env["WEIGHTCAST_NODE"] = nodes[rank]
            same = [r for r in range(nproc) if nodes[r] == nodes[rank]]
            rank_env.update(LOCAL_RANK=str(same.index(rank)), LOCAL_WORLD_SIZE=str(len(same)))
        p = ctx.Process(target=_rank_main, args=(scenario, args, rank_env, user_group, out), daemon=True)
        p.start()
        procs.append(p)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    return [_outcome(rank, p, os.path.join(tmp, f"rank{rank}.json")) for rank, p in enumerate(procs)]


def _outcome(rank: int, p: Any, path: str) -> Outcome:
    out = Outcome(rank=rank, pid=p.pid, exitcode=p.exitcode)
    if os.path.exists(path):
        with open(path) as fh:
            for key, value in json.load(fh).items():
                setattr(out, key, value)
    return out


def _rank_main(scenario: Callable[[dict], Any], args: dict, env: dict[str, str], user_group: bool,
               out: str) -> None:
    """One forked rank: set the environment, maybe create the group, run, write the outcome."""
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        if user_group:
            dist.init_process_group("gloo", init_method="env://")  # the default 30-minute timeout
        result["value"] = scenario(args)
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result.update(error_type=type(exc).__name__, error=str(exc), t_error=time.time())
    if _WRITERS:
        result["writers"] = wait_writers()
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, default=str)
    os.replace(tmp, out)
    os._exit(0 if "value" in result else 2)  # no interpreter teardown: it may wait on a dead peer


def load_scenario(args: dict) -> dict:
    """Scenario: one ``load_pretrained`` with this module's hooks -> ``{tensor: crc32}`` of
    what this rank got (``model: "seq"`` uses :func:`seq_model`)."""
    from weightcast.workers.api import load_pretrained
    from weightcast.workers.reader import tensor_crc32
    kwargs = dict(args)
    source = kwargs.pop("source")
    if kwargs.get("model") == "seq":
        kwargs["model"] = seq_model
    from weightcast.workers import file_lease
    from weightcast.workers.testing import inject
    file_lease.ENABLED = not os.environ.get("WC_NO_LEASES")
    with inject(phase_hook=phase_hook, reader_factory=reader_factory):
        result = load_pretrained(source, progress=False, **kwargs)
    tensors = result if isinstance(result, dict) else result.state_dict()
    return {name: tensor_crc32(t) for name, t in tensors.items()}


def sequence_scenario(args: dict) -> list[dict]:
    """Scenario: several loads in a row in the same process group, each with its own ``env``
    (WC_* variables) and load arguments: ``args = {"load": {...}, "cases": [{"env", "load"}]}``.
    -> per case ``{"value": ...}`` or ``{"type", "error"}``, and ``seconds``."""
    out = []
    for case in args["cases"]:
        saved = {k: v for k, v in os.environ.items() if k.startswith("WC_")}
        os.environ.update(case.get("env", {}))
        start = time.monotonic()
        try:
            out.append({"value": load_scenario({**args["load"], **case.get("load", {})})})
        except Exception as exc:  # noqa: BLE001 - compared by the test
            out.append({"type": type(exc).__name__, "error": str(exc)})
        out[-1]["seconds"] = time.monotonic() - start
        for key in [k for k in os.environ if k.startswith("WC_")]:
            del os.environ[key]
        os.environ.update(saved)
    return out


def seq_model() -> Any:
    """``Sequential(Linear(4, 3), Linear(3, 2))``; on rank ``WC_BAD_MODEL_RANK`` the first layer
    is ``Linear(4, 5)`` (a model that does not match the checkpoint on one rank only)."""
    import torch
    bad = os.environ.get("WC_BAD_MODEL_RANK")
    width = 5 if bad is not None and int(bad) == _my_rank() else 3
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(3, 2))


def seq_tensors() -> dict:
    """The state dict :func:`seq_model` expects (fixed values)."""
    import torch
    g = torch.Generator().manual_seed(3)
    return {"0.weight": torch.randn(3, 4, generator=g), "0.bias": torch.randn(3, generator=g),
            "1.weight": torch.randn(2, 3, generator=g), "1.bias": torch.randn(2, generator=g)}


def stray_processes() -> list[Any]:
    """Descendants of this process other than multiprocessing's forkserver and resource tracker
    (which serve every test): what a test must not leave behind."""
    import psutil
    me = os.getpid()
    out = []
    for child in psutil.Process(me).children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            server = child.ppid() == me and any(
                "multiprocessing.forkserver" in a or "resource_tracker" in a for a in child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if not server:  # ranks forked by the server share its command line but not its parent
            out.append(child)
    return out


# ------------------------------------------------------------------ what a load touches


class OpenRecorder:
    """Context manager recording every path opened in this process through ``os.open``,
    ``open`` / ``io.open`` and ``torch.UntypedStorage.from_file`` (mappings), except the
    interpreter's own files (``sys.prefix``), ``/proc``, ``/sys`` and staging areas."""

    def __enter__(self) -> "OpenRecorder":
        import builtins
        import io
        import sys
        import torch
        self.paths: list[str] = []
        self._skip = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix)}
                           | {"/proc/", "/sys/", "/dev/shm/weightcast-"})
        self._saved = [(os, "open", os.open), (builtins, "open", builtins.open), (io, "open", io.open)]
        for module, name, real in self._saved:
            setattr(module, name, self._wrap(real))
        real_map = torch.UntypedStorage.from_file
        torch.UntypedStorage.from_file = staticmethod(self._wrap(real_map))
        return self

    def _wrap(self, real: Callable) -> Callable:
        def opener(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, bytes, os.PathLike)):
                full = os.path.realpath(os.fsdecode(path))
                if not full.startswith(self._skip):
                    self.paths.append(full)
            return real(path, *args, **kwargs)
        return opener

    def __exit__(self, *exc: Any) -> None:
        import torch
        for module, name, real in self._saved:
            setattr(module, name, real)
        del torch.UntypedStorage.from_file  # the inherited one again

    def outside(self, *roots: str, ignore: tuple[str, ...] = ()) -> list[str]:
        """Opened paths not inside any of ``roots`` (real paths), ``ignore`` left out."""
        inside = tuple(os.path.realpath(r) + os.sep for r in roots)
        skip = {os.path.realpath(p) for p in ignore}
        return [p for p in self.paths if not p.startswith(inside) and p not in skip]


def reads_outside(log: str, root: str) -> list[list]:
    """Entries of a ``WC_READ_LOG`` that are not a plain file name of ``root`` read within the
    file's size (every read a FaultReader made must be)."""
    if not os.path.exists(log):
        return []
    bad = []
    with open(log) as fh:
        for line in fh:
            rank, file, offset, length = json.loads(line)
            path = os.path.join(root, file)
            plain = file and "/" not in file and "\\" not in file and file not in (".", "..")
            if not (plain and os.path.isfile(path) and 0 <= offset and offset + length <= os.path.getsize(path)):
                bad.append([rank, file, offset, length])
    return bad
