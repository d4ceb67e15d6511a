"""Liveness everywhere: a rank that dies or stops being heard is noticed by every survivor within
a bounded time in every phase, also while the survivors are busy with their own (slow) reads,
which stop; a stuck (SIGSTOPped) rank is named as stuck after ``timeout``.

Three gloo ranks (forked, tests/faults.py) load a tiny sharded checkpoint with slow storage
(every read sleeps); the measured delays are recorded as junit properties and printed.
"""
from __future__ import annotations

import json
import os
import signal

import pytest

from tests import faults
from tests.ckpt_factory import sample_tensors, write_sharded

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 10.0
SLOW = 0.4  # seconds per read on every rank: a survivor's own reads would last about 8 s or more
DEATH_BOUND = 2.0 + 0.5 + 3.5  # the target (2 s + the heartbeat period), plus slack for 2 shared cores
STUCK_BOUND = TIMEOUT + 2.0 + 6.0  # liveness.STUCK_MARGIN + slack


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    write_sharded(d, sample_tensors(), shards=3)
    return str(d)


def _args(ckpt: str, transport: str) -> dict:
    return {"source": ckpt, "model": None, "timeout": TIMEOUT, "transport": transport, "chunk_bytes": 64,
            "bucket_bytes": 256, "threads": 1}


def _death(mark) -> dict:
    with open(os.path.join(mark, "death.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("transport", ["collective", "node-shared"])
def test_death_mid_read_stops_the_survivors_reads(ckpt, tmp_path, transport, record_property) -> None:
    """Rank 1 is SIGKILLed at its first read while every rank's storage is slow: the survivors
    stop their own reads and raise within the bound, naming rank 1 as dead."""
    env = {"WC_READ": "kill@1", "WC_SLOW_READ": str(SLOW), "WC_MARK": str(tmp_path)}
    nodes = ["a", "b", "c"] if transport == "node-shared" else None
    outs = faults.run_ranks(3, faults.load_scenario, _args(ckpt, transport), env=env, timeout=120, nodes=nodes)
    death = _death(tmp_path)
    assert death["rank"] == 1 and outs[1].exitcode == -9
    delays = []
    for o in (outs[0], outs[2]):
        assert o.exitcode == 2 and o.error_type == "LoadError", (o.error_type, o.error)
        assert "Lost contact with rank 1 during the load: its process ended" in o.error, o.error
        delays.append(round(o.t_error - death["time"], 3))
    record_property("death_to_error_s", delays)
    print(f"\n{transport}: death mid-read -> survivors' errors after {delays} s")
    assert all(0 <= d < DEATH_BOUND for d in delays), delays
    assert faults.stray_processes() == []


@pytest.mark.parametrize("rank, phase", [(1, "transfer"), (0, "transfer"), (2, "materialize")])
def test_stopped_rank_is_named_stuck_after_the_timeout(ckpt, tmp_path, rank, phase, record_property) -> None:
    """A rank SIGSTOPped (alive, silent): every other rank raises once it has been silent for
    ``timeout`` + 2 s, naming it as stuck; never a multiple of the timeout."""
    env = {"WC_FAULT": f"stop@{rank}:{phase}", "WC_SLOW_READ": "0.05", "WC_MARK": str(tmp_path)}
    outs = faults.run_ranks(3, faults.load_scenario, _args(ckpt, "collective"), env=env,
                            timeout=STUCK_BOUND + 15)
    stopped = _death(tmp_path)
    assert stopped["rank"] == rank and outs[rank].exitcode == -9  # killed by run_ranks at its deadline
    delays = []
    for o in outs:
        if o.rank == rank:
            continue
        assert o.exitcode == 2 and o.error_type == "LoadError", (o.error_type, o.error)
        assert f"Lost contact with rank {rank} during the load: it is stuck" in o.error, o.error
        delays.append(round(o.t_error - stopped["time"], 3))
    record_property("stop_to_error_s", delays)
    print(f"\nrank {rank} stopped in {phase}: survivors' errors after {delays} s")
    assert all(TIMEOUT - 1 <= d < STUCK_BOUND for d in delays), delays
    assert faults.stray_processes() == []
