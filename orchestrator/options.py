"""Checks of the load and save options every entry point shares (API, CLI, torchrun, Ray).

Pure and cheap: each check returns the value it accepted or raises :class:`ConfigError` naming
the option, what it accepts, what it got and the fix. Called once, at the edge (``load_pretrained``,
``save_pretrained``, the ``weightcast`` commands), before any rank starts work.
"""
from __future__ import annotations

import math

from weightcast.orchestrator.errors import ConfigError

MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""Longest timeout accepted (a week); torch.distributed's millisecond timeouts overflow far beyond."""

MAX_THREADS = 256
"""Most read threads per rank accepted."""


def check_timeout(value: object, name: str = "timeout") -> float:
    """A timeout in seconds: a finite number in (0, :data:`MAX_TIMEOUT_S`]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise ConfigError(f"Invalid {name}", where=name,
                          expected=f"a number of seconds > 0 and <= {MAX_TIMEOUT_S:g} (one week)", got=repr(value),
                          fix="pass e.g. 300 (the default); raise it for slow storage")
    return float(value)


def check_count(value: object, name: str, *, minimum: int = 1, maximum: int | None = None,
                fix: str | None = None) -> int:
    """An integer in ``[minimum, maximum]`` (``maximum`` None: unbounded)."""
    ok = type(value) is int and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigError(f"Invalid {name}", where=name, expected=f"an integer >= {minimum}{upper}",
                          got=repr(value), fix=fix or f"pass a value in that range for {name}")
    return value


def check_load_options(*, timeout: object, bucket_bytes: object, chunk_bytes: object, threads: object) -> None:
    """The numeric options of ``load_pretrained`` (every rank calls it, not collective)."""
    check_timeout(timeout)
    check_count(bucket_bytes, "bucket_bytes", fix="pass a size in bytes, e.g. 256 << 20")
    check_count(chunk_bytes, "chunk_bytes", fix="pass a size in bytes, e.g. 64 << 20")
    check_count(threads, "threads", maximum=MAX_THREADS, fix="pass 1 to 16 read threads per rank")
