"""Fault-injection seams for tests (not part of the public API).

A load asks this module for its storage reader (:func:`make_reader`) and calls
:func:`at_phase` at the start of each phase (``plan``, ``transfer``, ``materialize``), and at
``materialize-checked`` once a node-shared rank's file checks before materialize passed (the
moment before it first touches the mapped pages). Outside
:func:`inject` they are the real reader (files, object storage) and nothing.
Tests replace them for the loads made inside ``with inject(...)`` in this process (each rank
process sets its own): a reader that fails, truncates or kills its rank, a hook that raises or
dies in a given phase. Not collective; not thread-safe (set before the load starts).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

ReaderFactory = Callable[[str, Iterable[Any]], Any]
PhaseHook = Callable[[str, int], None]


@dataclass
class _Seams:
    reader_factory: ReaderFactory | None = None
    phase_hook: PhaseHook | None = None


_ACTIVE = _Seams()


@contextlib.contextmanager
def inject(*, reader_factory: ReaderFactory | None = None, phase_hook: PhaseHook | None = None) -> Iterator[None]:
    """Within the block, loads in this process read through ``reader_factory(root, file_stamps)``
    (a ``StorageReader``) and call ``phase_hook(phase, rank)`` at each phase start."""
    saved = (_ACTIVE.reader_factory, _ACTIVE.phase_hook)
    _ACTIVE.reader_factory, _ACTIVE.phase_hook = reader_factory, phase_hook
    try:
        yield
    finally:
        _ACTIVE.reader_factory, _ACTIVE.phase_hook = saved


def make_reader(root: str, stamps: Iterable[Any], real: Callable[[], Any]) -> Any:
    """This rank's storage reader for a load: the injected one, else ``real()``."""
    if _ACTIVE.reader_factory is not None:
        return _ACTIVE.reader_factory(root, stamps)
    return real()


def at_phase(phase: str, rank: int) -> None:
    """Called by every rank at the start of each phase of a load: runs the injected hook."""
    if _ACTIVE.phase_hook is not None:
        _ACTIVE.phase_hook(phase, rank)
