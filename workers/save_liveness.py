"""Failing together during a save: one verdict, agreed through the rendezvous store.

Who calls what: ``weightcast.workers.save`` makes one :class:`Watch` per multi-rank call. Each rank
beats a heartbeat counter in the store while the call runs, and marks each exchange it reaches
(:meth:`Watch.reached`). A rank whose own step fails posts its error (:meth:`Watch.fail`)
*before* it closes its connections, so the peers, whose next send, receive or exchange with it
then fails at once, find that error (:meth:`Watch.lost`) and raise the same one. When no error
was posted, the rank that notices first names the ranks that never reached the exchange
(dead: their heartbeat stopped; or still busy), and that verdict is what every rank raises. The
store's ``compare_set`` makes the first verdict the only one. Rank 0 waits a few seconds for
the others to read it, since the store usually lives in rank 0's process; not for the ranks
the verdict names (dead or stuck), so no rank waits past ``timeout`` + WINDOW + a moment.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

PERIOD = 0.25  # seconds between heartbeats
WINDOW = 1.5   # a heartbeat that does not move for this long is a dead process
LINGER = 5.0   # rank 0 waits at most this long for the others to read the verdict


def default_store() -> Any:
    """The default process group's store (None when there is none)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store: verdicts are local only
        return None


class Watch:
    """Heartbeat, exchange marks and the agreed verdict of one save call."""

    def __init__(self, rank: int, world: int, node: str, call: int) -> None:
        self.rank, self.world, self.node = rank, world, node
        self.prefix = f"weightcast/save/{call}"
        self.store = default_store() if world > 1 else None
        self._stop = threading.Event()
        self._thread = None
        if self.store is not None:
            self._thread = threading.Thread(target=self._beat, name="weightcast-save-heartbeat", daemon=True)
            self._thread.start()

    def _key(self, *parts: object) -> str:
        return "/".join((self.prefix, *map(str, parts)))

    def _beat(self) -> None:
        while True:
            try:
                self.store.add(self._key("hb", self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is gone: nothing left to tell
                return
            if self._stop.wait(PERIOD):
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * PERIOD + 1)

    def reached(self, phase: str) -> None:
        """Mark that this rank reached the exchange at the end of ``phase``."""
        try:
            if self.store is not None:
                self.store.set(self._key("at", phase, self.rank), "1")
        except Exception:  # noqa: BLE001 - best effort
            pass

    def fail(self, phase: str, exc: BaseException) -> dict:
        """This rank's step failed: post the error (first verdict wins) and return the verdict."""
        mine = {"kind": "error", "phase": phase, "rank": self.rank, "node": self.node,
                "type": type(exc).__name__, "msg": str(exc)}
        return self._decide(mine) or mine

    def lost(self, phase: str, exc: BaseException) -> dict:
        """An exchange failed: the posted verdict, or one naming the ranks that did not reach it."""
        cause = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        unknown = {"kind": "lost", "phase": phase, "ranks": None, "dead": True, "cause": cause}
        if self.store is None:
            return unknown
        try:
            posted = self.store.check([self._key("verdict")])
            verdict = None if posted else self._absent(phase, cause)
        except Exception:  # noqa: BLE001 - the store is gone with the process that served it
            return unknown
        return self._decide(verdict) or unknown

    def _absent(self, phase: str, cause: str) -> dict:
        before = {r: self.store.add(self._key("hb", r), 0) for r in range(self.world)}
        deadline = time.monotonic() + WINDOW
        absent = list(range(self.world))
        while time.monotonic() < deadline:
            absent = [r for r in absent if not self.store.check([self._key("at", phase, r)])]
            time.sleep(PERIOD)
        dead = [r for r in absent if r != self.rank and self.store.add(self._key("hb", r), 0) == before[r]]
        return {"kind": "lost", "phase": phase, "ranks": dead or absent, "dead": bool(dead), "cause": cause}

    def _decide(self, verdict: dict | None) -> dict | None:
        """Store ``verdict`` unless one is there; return the stored one (None: no store)."""
        if self.store is None:
            return None
        try:
            if verdict is None:
                got = json.loads(self.store.get(self._key("verdict")))
            else:
                got = json.loads(self.store.compare_set(self._key("verdict"), "", json.dumps(verdict)))
            self.store.set(self._key("ack", self.rank), "1")
        except Exception:  # noqa: BLE001
            return None
        if self.rank == 0:
            self._linger(got)
        return got

    def _linger(self, verdict: dict) -> None:
        """Rank 0: wait (at most LINGER s) until every rank that can read ``verdict`` has. The
        ranks it names are not waited for: a dead one never reads it, a stuck one only once it
        wakes, well past the timeout every other rank is bound by."""
        named = set(verdict.get("ranks") or []) if verdict["kind"] == "lost" else set()
        wait = [r for r in range(self.world) if r not in named and r != self.rank]
        deadline = time.monotonic() + LINGER
        try:
            while wait and time.monotonic() < deadline:
                wait = [r for r in wait if not self.store.check([self._key("ack", r)])]
                time.sleep(0.05)
        except Exception:  # noqa: BLE001
            pass
