"""Ctrl-C and SIGTERM at the edge: both end a load the same way, with its clean-up.

A terminal's Ctrl-C raises ``KeyboardInterrupt``; a scheduler (Slurm, Kubernetes, torchrun's
agent, the local launcher stopping its ranks) sends SIGTERM, whose default action ends the
process at once: no ``finally`` runs, so staging areas, temporary directories and child
processes would be left behind. Within :func:`interrupts_raise`, the first SIGINT or SIGTERM
raises in the main thread (:class:`Terminated` for SIGTERM, a ``KeyboardInterrupt`` too) and
later ones are ignored, so the clean-up that the first one started is not cut short (the
launcher still ends a rank that takes too long with SIGKILL).

Used by the processes' entry points only (the local launcher behind the CLI, a local rank, a
torchrun worker), never inside a load: a program that calls ``load_pretrained`` keeps its own
signal handling.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM received: ends the work as Ctrl-C does (exit status 143 in the CLI)."""

    def __init__(self, message: str = "terminated (SIGTERM)") -> None:
        super().__init__(message)


def exit_status(exc: BaseException) -> int:
    """The shell's status for an interrupted command: 143 after SIGTERM, else 130 (Ctrl-C)."""
    return 143 if isinstance(exc, Terminated) else 130


def describe(exc: BaseException) -> str:
    """``terminated (SIGTERM)`` or ``interrupted``."""
    return str(exc) if isinstance(exc, Terminated) else "interrupted"


@contextlib.contextmanager
def interrupts_raise(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises (SIGTERM: :class:`Terminated`; SIGINT:
    ``KeyboardInterrupt``) and later ones are ignored; the previous handlers are restored after.
    Outside the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return  # the clean-up of the first one runs: do not cut it short
        fired.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    saved = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def interrupts_ignored(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block (main thread only), ``signals`` are ignored: a launcher stopping its ranks
    after a first interrupt finishes that work before the next one can act."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)
