"""The liveness threads end with the load: ``Liveness.stop`` wakes them instead of waiting for
their next poll. Hub (rank 0) and one rank run in this process over loopback TCP, with the poll
and heartbeat periods stretched to 30 s, so a thread that only noticed ``stop`` at its next poll
would keep ``stop`` waiting about 30 s."""
from __future__ import annotations

import time

from weightcast.workers import liveness


def _pair(monkeypatch) -> tuple[liveness.Liveness, liveness.Liveness]:
    monkeypatch.setattr(liveness, "_TICK", 30.0)
    monkeypatch.setattr(liveness, "PERIOD", 30.0)
    shared: dict[str, bytes] = {}

    def share(blob: bytes | None) -> bytes:
        if blob is not None:
            shared["hub"] = blob
        return shared["hub"]

    hub = liveness.start(0, 2, 10.0, "node0", share, "127.0.0.1")
    rank = liveness.start(1, 2, 10.0, "node0", share, "127.0.0.1")
    return hub, rank


def _stop(live: liveness.Liveness) -> float:
    t0 = time.monotonic()
    live.stop()
    return time.monotonic() - t0


def test_stop_ends_rank_then_hub_thread_at_once(monkeypatch) -> None:
    hub, rank = _pair(monkeypatch)
    time.sleep(0.2)  # the hub has accepted the rank and both threads wait in their 30 s poll
    took = [_stop(rank), _stop(hub)]
    assert not rank._thread.is_alive() and not hub._thread.is_alive()
    assert max(took) < 5.0, f"stop() waited {took} s for the threads' next poll"
    assert rank.verdict is None and hub.verdict is None  # leaving is not taken for dying


def test_stop_ends_hub_then_rank_thread_at_once(monkeypatch) -> None:
    hub, rank = _pair(monkeypatch)
    time.sleep(0.2)
    took = [_stop(hub), _stop(rank)]
    assert not rank._thread.is_alive() and not hub._thread.is_alive()
    assert max(took) < 5.0, f"stop() waited {took} s for the threads' next poll"
    assert rank.verdict is None and hub.verdict is None
