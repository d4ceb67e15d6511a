"""``Group``: the ranks of one load (or save) and the process groups it talks on.

A leaf type shared by the collectives, the process-group setup, the coordination round and the
transports; :func:`dead_ranks` tells which peers of this host are gone (from the pids exchanged
when the group was formed). Nothing here is collective.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Group:
    """The ranks of one load (or save). ``pg`` is a gloo group with the call's timeout (None:
    one rank), for the coordination round and status exchanges; ``phase_pg`` a second one for
    what happens inside a phase, dropped by a failing rank (:func:`abort_phase`); ``data_pg``
    moves tensor data (``phase_pg`` on CPU, the NCCL default group on CUDA). ``processes``:
    every rank's ``(host, pid)``, to name dead peers. ``watch`` and ``hook``: a save's
    liveness watch and fault hook (see :mod:`weightcast.workers.save`); ``liveness``: a load's
    heartbeat channel (see :mod:`weightcast.workers.liveness`)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: str
    pg: Any = None
    data_pg: Any = None
    timeout: float = 300.0
    owns_default: bool = False
    phase_pg: Any = None
    processes: tuple[tuple[str, int], ...] = ()
    watch: Any = None
    hook: Callable[[str, str], None] | None = None
    liveness: Any = None  # a load's weightcast.workers.liveness.Liveness


def dead_ranks(group: Group) -> list[int]:
    """Ranks on this machine whose process has exited (known from the pids exchanged at setup)."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(group.processes)
            if h == host and r != group.rank and not _running(pid)]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
