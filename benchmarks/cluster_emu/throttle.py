"""The storage's aggregate bandwidth cap: a token bucket shared by every reader (thread-safe).
Used by the FUSE daemon (:mod:`benchmarks.cluster_emu.storagefs`) on every read it serves."""
from __future__ import annotations

import threading
import time


class TokenBucket:
    """Aggregate cap: a request of ``n`` bytes may finish no earlier than its turn in a single
    queue drained at ``rate`` bytes/s (GCRA with ``burst`` bytes of slack). Thread-safe; requests
    are served in the order they reserve, so concurrent readers share the rate fairly."""

    def __init__(self, rate: float, burst: int = 1 << 20) -> None:
        self.rate = float(rate)
        self.tau = burst / self.rate
        self._tat = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Reserve ``n`` bytes and sleep until they may be delivered; -> seconds slept."""
        with self._lock:
            now = time.monotonic()
            self._tat = max(self._tat, now) + n / self.rate
            delay = self._tat - now - self.tau
        if delay > 0:
            time.sleep(delay)
            return delay
        return 0.0
