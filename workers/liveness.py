"""Liveness: every rank of a load hears every other, on a channel of its own.

Rank 0 runs a small hub (one TCP listening socket, one thread); every other rank keeps one
connection to it and a thread that sends a heartbeat every :data:`PERIOD` seconds. The hub sends
its own heartbeat to every rank. What that gives, whatever the main threads are doing (reading,
in a gloo collective, materializing):

- a rank that **dies** (SIGKILL, OOM killer, crash) closes its socket (the kernel does it): the hub
  sees the end of the stream at once and tells every other rank; if rank 0 dies, every rank sees
  its connection end. The verdict reaches every survivor within milliseconds.
- a rank that **stops being heard** (SIGSTOP, a frozen host, a partition) is declared stuck once
  it has been silent for ``timeout`` + :data:`STUCK_MARGIN` seconds (heartbeats come from their
  own thread, so a slow main thread is never silent; only a process that cannot run is, or one
  whose main thread holds the interpreter lock in a long native call). A silent rank on the same
  host is declared stuck only if its process is stopped (``/proc``: state T), dead if it is gone;
  a silent rank elsewhere is declared stuck on silence alone.

The verdict is a :class:`LoadError` naming the rank, the same text on every rank (the hub words
it). :meth:`Liveness.check` raises it: the read threads and the transfer loops call it between
requests, so reads stop as soon as a peer is lost. A rank that ends its part of the load says
goodbye first, so leaving is never taken for dying.

Who calls what: :func:`start` on every rank after the group is formed (collective: rank 0
broadcasts the hub's address); :meth:`Liveness.stop` on every rank at the end of the load.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from typing import Any, Callable

from weightcast.orchestrator.errors import LoadError

PERIOD = 0.5
"""Seconds between heartbeats."""

_TICK = 0.1  # how often the threads look at their socket and at stop()

STUCK_MARGIN = 2.0
"""Seconds of silence beyond ``timeout`` before a rank is declared stuck: a main thread may hold
the interpreter lock for up to ``timeout`` (a gloo group being destroyed waits for its pending
operation to time out), which silences a live rank's heartbeat thread that long."""


class Liveness:
    """This rank's view of its peers; thread-safe. ``verdict`` is None while every peer is heard."""

    def __init__(self, rank: int, world: int, timeout: float, node: str) -> None:
        self.rank, self.world, self.timeout, self.node = rank, world, timeout, node
        self.stuck_after = timeout + STUCK_MARGIN
        self._verdict: LoadError | None = None
        self._info: dict | None = None
        self._quiet: tuple[int, float] = (-1, 0.0)  # the most silent peer and for how long (hub's view)
        self._hub_heard: float | None = None  # when this rank last heard the hub (monotonic; not on rank 0)
        self._done = threading.Event()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None  # a rank's connection to the hub (the hub: its wake-up socket)
        self._hub_process: tuple[str, int] | None = None  # rank 0's (host name, pid)

    # ------------------------------------------------------------------ what callers use

    @property
    def verdict(self) -> LoadError | None:
        return self._verdict

    @property
    def info(self) -> dict | None:
        """The verdict as data: ``{"rank", "how": "died"|"stuck", "silent_s"}``."""
        return self._info

    def check(self) -> None:
        """Raise the verdict if a peer was lost (any thread; cheap)."""
        if self._verdict is not None:
            raise self._verdict

    def quiet_peer(self) -> tuple[int, float]:
        """(rank, seconds) of the peer heard least recently, as last reported by the hub, counted
        only when that peer may be stuck (its process is stopped, or it runs on another host;
        0 seconds otherwise). A silent hub reports nothing: then rank 0 itself, for as long as
        this rank has not heard it, when its process may be stuck."""
        heard = self._hub_heard
        if heard is not None:
            silent = time.monotonic() - heard
            if silent > self._quiet[1] and silent > 2 * PERIOD and silent_process(self._hub_process) is not None:
                return (0, silent)
        return self._quiet

    def wait_verdict(self, seconds: float) -> LoadError | None:
        """Wait up to ``seconds`` for a verdict; -> it or None."""
        with self._cond:
            self._cond.wait_for(lambda: self._verdict is not None or self._done.is_set(), max(0.0, seconds))
        return self._verdict

    def stop(self) -> None:
        """End this rank's part (every rank, at the end of the load, success or not): say goodbye,
        close, join the thread. Idempotent."""
        if self._done.is_set():
            return
        self._done.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5 * PERIOD + 1)
        if self.rank == 0 and self._sock is not None:
            self._sock.close()  # the hub's end of its wake-up pair (the hub closed its own)
        with self._cond:
            self._cond.notify_all()

    def _wake(self) -> None:
        """The thread sees stop() now, not after its next tick: a byte on the hub's wake-up
        socket; a rank's read side shut (its blocked recv returns; the goodbye still goes out)."""
        sock = self._sock
        if sock is None:
            return
        try:
            if self.rank == 0:
                sock.send(b"w")
            else:
                sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # the thread already ended, or ends at its next tick

    # ------------------------------------------------------------------ verdicts

    def _decide(self, info: dict) -> None:
        with self._cond:
            if self._verdict is None and not self._done.is_set():
                self._info = info
                self._verdict = _error(info, self.timeout, self.rank, self.node)
                self._cond.notify_all()


def _error(info: dict, timeout: float, me: int, node: str) -> LoadError:
    rank = info["rank"]
    if info["how"] == "died":
        what = (f"Lost contact with rank {rank} during the load: its process ended "
                "(killed, out of memory or crashed)")
        fix = (f"check rank {rank}'s log and the kernel log (dmesg: the out-of-memory killer), then run the load "
               f"again (a rank silent for timeout={timeout:g} s would count as stuck)")
    else:
        what = (f"Lost contact with rank {rank} during the load: it is stuck, not heard from for "
                f"{info['silent_s']:.1f} s (process stopped, frozen or its host unreachable)")
        fix = (f"check rank {rank}'s process and host (a SIGSTOP, swapping, a network partition); "
               f"a rank silent for timeout={timeout:g} s + {STUCK_MARGIN:g} s counts as stuck")
    return LoadError(what, where=f"seen by rank {me} on host {node}", got=f"liveness: {info['how']}", fix=fix)


def start(rank: int, world: int, timeout: float, node: str, share: Callable[[bytes | None], bytes],
          host: str) -> Liveness:
    """Every rank: start this rank's liveness (rank 0: the hub). ``share`` broadcasts rank 0's
    bytes to every rank (collective); ``host`` is the address rank 0's hub listens on."""
    live = Liveness(rank, world, timeout, node)
    if world == 1:
        live._done.set()
        return live
    if rank == 0:
        listener = socket.create_server((host, 0), backlog=min(world, 4096))
        address = json.dumps([host, listener.getsockname()[1], os.getpid(), socket.gethostname()]).encode()
        share(address)
        wake, live._sock = socket.socketpair()
        live._thread = threading.Thread(target=_Hub(live, listener, wake).run, name="weightcast-liveness-hub",
                                        daemon=True)
    else:
        host, port, hub_pid, hub_host = json.loads(share(None))
        live._hub_process = (hub_host, hub_pid)
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.sendall(f"r {rank} {os.getpid()} {socket.gethostname()}\n".encode())
        live._sock = sock
        live._thread = threading.Thread(target=_client, args=(live, sock), name="weightcast-liveness", daemon=True)
    live._thread.start()
    return live


def silent_process(process: tuple[str, int] | None) -> str | None:
    """What a peer silent past ``stuck_after`` is: ``"stuck"``, ``"died"``, or None when it runs on
    this host and is neither stopped nor gone (its main thread holds the interpreter lock, or the
    host is overloaded: not stuck; gloo's own timeout still bounds the wait on it)."""
    if process is None or process[0] != socket.gethostname():
        return "stuck"  # another host: silence is all there is to go on
    try:
        with open(f"/proc/{process[1]}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "died"
    if state in (b"Z", b"X"):
        return "died"
    return "stuck" if state in (b"T", b"t") else None


# ------------------------------------------------------------------ rank 0: the hub


class _Hub:
    """Rank 0's thread: accepts every rank, hears them, tells everyone the first loss."""

    def __init__(self, live: Liveness, listener: socket.socket, wake: socket.socket) -> None:
        self.live, self.listener, self.wake = live, listener, wake
        self.sel = selectors.DefaultSelector()
        self.conns: dict[socket.socket, list] = {}  # sock -> [rank or None, buffer]
        self.heard = {r: time.monotonic() for r in range(1, live.world)}
        self.gone: set[int] = set()  # said goodbye
        self.socks: dict[int, socket.socket] = {}
        self.processes: dict[int, tuple[str, int]] = {}  # rank -> (host name, pid)

    def run(self) -> None:
        live = self.live
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.sel.register(self.wake, selectors.EVENT_READ)  # stop(): the loop ends without waiting a tick
        next_beat = 0.0
        try:
            while not live._done.is_set():
                for key, _ in self.sel.select(_TICK):
                    if key.fileobj is self.wake:
                        continue
                    self._accept() if key.fileobj is self.listener else self._receive(key.fileobj)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + PERIOD
                    self._beat(now)
        finally:
            self._close()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        self.conns[sock] = [None, b""]
        self.sel.register(sock, selectors.EVENT_READ)

    def _receive(self, sock: Any) -> None:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        state = self.conns.get(sock)
        if state is None:
            return
        if not data:
            self._drop(sock)
            if state[0] is not None and state[0] not in self.gone:
                self._lost(state[0], "died", 0.0)
            return
        state[1] += data
        *lines, state[1] = state[1].split(b"\n")
        for line in lines:
            self._line(sock, state, line.decode(errors="replace"))

    def _line(self, sock: Any, state: list, line: str) -> None:
        if line.startswith("r "):
            rank, pid, host = line[2:].split(" ", 2)
            state[0] = int(rank)
            self.processes[state[0]] = (host, int(pid))
            self.socks[state[0]] = sock
        if state[0] is None:
            return
        self.heard[state[0]] = time.monotonic()
        if line == "bye":
            self.gone.add(state[0])

    def _beat(self, now: float) -> None:
        """Send every rank a heartbeat with the quietest peer; declare a silent one stuck."""
        live = self.live
        waiting = {r: now - t for r, t in self.heard.items() if r not in self.gone}
        quiet = max(waiting.items(), key=lambda kv: kv[1], default=(-1, 0.0))
        how = silent_process(self.processes.get(quiet[0])) if quiet[0] >= 0 and quiet[1] > 3.0 else None
        live._quiet = (quiet[0], quiet[1] if how is not None else 0.0)  # only a suspect counts as quiet
        if how is not None and quiet[1] > live.stuck_after:
            self._lost(quiet[0], how, quiet[1])
        self._send_all(f"h {live._quiet[0]} {live._quiet[1]:.3f}\n".encode())

    def _lost(self, rank: int, how: str, silent: float) -> None:
        info = {"rank": rank, "how": how, "silent_s": round(silent, 3)}
        self.live._decide(info)
        self._send_all(f"v {json.dumps(self.live.info)}\n".encode())

    def _send_all(self, data: bytes) -> None:
        for sock, state in list(self.conns.items()):
            if state[0] is None or state[0] in self.gone:
                continue
            try:
                sock.send(data)
            except (BlockingIOError, InterruptedError):
                pass  # its buffer is full: it is not reading; its own silence check applies
            except OSError:
                self._drop(sock)

    def _drop(self, sock: Any) -> None:
        self.conns.pop(sock, None)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _close(self) -> None:
        self._send_all(b"bye\n")
        for sock in list(self.conns):
            self._drop(sock)
        self.wake.close()
        self.sel.close()
        self.listener.close()


# ------------------------------------------------------------------ other ranks


def _client(live: Liveness, sock: socket.socket) -> None:
    """A rank's thread: heartbeat to the hub, hear the hub, adopt its verdicts."""
    sock.settimeout(_TICK)
    heard, buffer, next_beat = time.monotonic(), b"", 0.0
    live._hub_heard = heard
    try:
        while not live._done.is_set():
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + PERIOD
                try:
                    sock.sendall(b"h\n")
                except OSError:
                    live._decide({"rank": 0, "how": "died", "silent_s": 0.0})
                    return
            try:
                data = sock.recv(4096)
            except socket.timeout:
                data = None
            except OSError:
                data = b""
            if data == b"":
                live._decide({"rank": 0, "how": "died", "silent_s": 0.0})
                return
            now = time.monotonic()
            if data:
                heard = live._hub_heard = now
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                if _client_lines(live, lines):
                    return
            elif now - heard > live.stuck_after:
                how = silent_process(live._hub_process)
                if how is not None:
                    live._decide({"rank": 0, "how": how, "silent_s": round(now - heard, 3)})
    finally:
        try:
            sock.sendall(b"bye\n")
        except OSError:
            pass
        sock.close()


def _client_lines(live: Liveness, lines: list[bytes]) -> bool:
    """Handle the hub's lines; True when the hub said goodbye."""
    for raw in lines:
        line = raw.decode(errors="replace")
        if line == "bye":
            return True
        if line.startswith("v "):
            live._decide(json.loads(line[2:]))
        elif line.startswith("h "):
            rank, seconds = line[2:].split()
            live._quiet = (int(rank), float(seconds))
    return False


# ------------------------------------------------------------------ wiring into a load


def hub_host(master_addr: str | None) -> str:
    """The address rank 0's hub listens on: this host's address on the route to ``master_addr``
    (the torchrun master), else the host name's."""
    if master_addr:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((socket.gethostbyname(master_addr), 9))  # no packet is sent
                return probe.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def start_for(group: Any, master_addr: str | None) -> Liveness:
    """Every rank of a load, right after the group is formed (collective over ``group.pg``)."""
    from weightcast.workers.collectives import broadcast_bytes
    host = hub_host(master_addr) if group.rank == 0 else ""
    live = start(group.rank, group.world_size, group.timeout, group.node,
                 lambda blob: broadcast_bytes(group, blob, what="starting the liveness channel"), host)
    group.liveness = live
    return live


def of(group: Any) -> Liveness | None:
    """The load's Liveness, if one runs."""
    return group.liveness if group is not None else None


class GuardedReader:
    """A StorageReader that stops at the first lost peer: every request of at most
    ``piece`` bytes is preceded by :meth:`Liveness.check`."""

    def __init__(self, inner: Any, live: Liveness, piece: int = 16 << 20) -> None:
        self.inner, self.live, self.piece = inner, live, piece

    def __getattr__(self, name: str) -> Any:  # bytes_read, request_bytes, ... of the real reader
        return getattr(self.inner, name)

    def read_into(self, file: str, offset: int, dest: Any) -> None:
        view = memoryview(dest).cast("B")
        for at in range(0, len(view), self.piece) if len(view) else (0,):
            self.live.check()
            self.inner.read_into(file, offset + at, view[at:at + self.piece])

    def close(self) -> None:
        self.inner.close()
