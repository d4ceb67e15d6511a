"""Fail together: a rank killed or failing in any phase makes every other rank raise, quickly.

Three gloo ranks load a tiny sharded checkpoint while rank 1 is SIGKILLed before the plan, at its
first read, or at its first data collective, with the process group created by weightcast (the
torchrun environment) and with one the user created first (default 30-minute timeout). Every
survivor must raise a LoadError within ``timeout`` + a few seconds of the death (the measured
delay is recorded as the junit property ``death_to_error_s``), and no process may remain.
Exceptions (not deaths) on one rank become the same error on every rank, naming that rank: the
rank's own WeightcastError class (also a LoadError), or a LoadError for any other exception.
Ranks are forked from a forkserver (tests/faults.py) so each run costs a fraction of a second;
one test runs real interpreters through ``weightcast.launch.local.spawn`` and the node-shared transport.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from tests import faults
from tests.ckpt_factory import sample_tensors, write_sharded

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 10.0  # the loads' timeout
BOUND = TIMEOUT + 5.0  # "within the timeout + a few seconds"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = {
    "before-plan": {"WC_FAULT": "kill@1:plan"},
    "first-read": {"WC_READ": "kill@1"},
    "mid-transfer": {"WC_FAULT": "kill-on-send@1:transfer"},
    "materialize": {"WC_FAULT": "kill@1:materialize"},
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    write_sharded(d, sample_tensors(), shards=3)
    return str(d)


@pytest.fixture(scope="module")
def seq_ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("seq")
    save_file(faults.seq_tensors(), str(d / "model.safetensors"))
    return str(d)


def _load_args(source: str, **kw) -> dict:
    return {"source": source, "model": None, "timeout": TIMEOUT, "transport": "collective",
            "chunk_bytes": 128, "bucket_bytes": 512, **kw}


def _death(mark) -> dict:
    with open(os.path.join(mark, "death.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("group", ["weightcast-group", "user-group"])
@pytest.mark.parametrize("where", sorted(KILLS))
def test_killed_rank_fails_every_survivor(ckpt, tmp_path, where, group, record_property):
    env = {**KILLS[where], "WC_MARK": str(tmp_path)}
    outs = faults.run_ranks(3, faults.load_scenario, _load_args(ckpt), env=env,
                            user_group=group == "user-group", timeout=BOUND + 30)
    death = _death(tmp_path)
    assert death["rank"] == 1 and outs[1].exitcode == -9
    delays = []
    for o in (outs[0], outs[2]):
        assert o.exitcode == 2 and o.error_type == "LoadError", (o.error_type, o.error)
        assert "Lost contact with rank 1 during the load: its process ended" in o.error, o.error
        assert f"seen by rank {o.rank}" in o.error
        assert "Fix:" in o.error and f"timeout={TIMEOUT:g} s" in o.error
        delays.append(round(o.t_error - death["time"], 3))
    assert all(0 <= d < BOUND for d in delays), delays
    record_property("death_to_error_s", delays)
    print(f"\ndeath-to-error {where} {group}: {delays} s")
    assert faults.stray_processes() == []


def test_exceptions_become_the_same_error_on_every_rank(ckpt, seq_ckpt, record_property):
    """One process group, several loads: each failure names the failing rank and its cause on
    every rank, identically; the group stays usable (the last load succeeds)."""
    cases = [  # a weightcast error keeps its class on every rank; anything else is a LoadError
        ({"env": {"WC_FAULT": "raise@2:plan"}}, "LoadError", "during plan on rank 2", "RuntimeError: injected failure"),
        ({"env": {"WC_FAULT": "interrupt@1:transfer"}}, "LoadError", "during transfer on rank 1", "KeyboardInterrupt"),
        ({"env": {"WC_READ": "eio@1"}}, "StorageError", "during transfer on rank 1", "Input/output error"),
        ({"env": {"WC_BAD_MODEL_RANK": "1"}, "load": {"source": seq_ckpt, "model": "seq"}}, "ModelMismatchError",
         "during materialize on rank 1", "ModelMismatchError: A checkpoint tensor does not fit the model"),
        ({"load": {"dtype": "float7"}}, "ConfigError", "during plan on rank 0 (and ranks [1, 2])",
         "ConfigError: Unknown dtype"),
        ({"env": {"WC_FAULT": "interrupt@0:materialize"}}, "LoadError", "during materialize on rank 0",
         "KeyboardInterrupt"),
    ]
    args = {"load": _load_args(ckpt), "cases": [c for c, _, _, _ in cases] + [{}]}
    outs = faults.run_ranks(3, faults.sequence_scenario, args, user_group=True, timeout=120)
    assert [o.exitcode for o in outs] == [0, 0, 0], [o.error for o in outs]
    for i, (_, kind, head, cause) in enumerate(cases):
        got = [o.value[i] for o in outs]
        assert all(g.get("type") == kind for g in got), got
        assert len({g["error"] for g in got}) == 1, got  # the same message on every rank
        assert head in got[0]["error"] and cause in got[0]["error"], got[0]["error"]
        assert "Where: " in got[0]["error"] and "Fix:" in got[0]["error"]
    assert all("value" in o.value[-1] for o in outs)  # the group survived every failure
    seconds = [round(max(o.value[i]["seconds"] for o in outs), 2) for i in range(len(cases))]
    record_property("seconds_per_case", seconds)
    print(f"\nfailed loads, slowest rank's seconds per case: {seconds}")
    assert faults.stray_processes() == []


def test_user_group_survives_a_failed_load(ckpt):
    """After a failed load the user's own process group still works (all-reduce on it)."""
    outs = faults.run_ranks(2, _fail_then_all_reduce, _load_args(ckpt), user_group=True, timeout=60)
    assert [o.value for o in outs] == [["LoadError", 3.0], ["LoadError", 3.0]], [o.error for o in outs]


def _fail_then_all_reduce(args: dict) -> list:
    import torch.distributed as dist
    os.environ["WC_FAULT"] = "raise@1:transfer"
    try:
        faults.load_scenario(args)
        kind = "no error"
    except Exception as exc:  # noqa: BLE001
        kind = type(exc).__name__
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return [kind, t.item()]


def test_kill_in_real_processes_node_shared_leaves_no_staging(ckpt, tmp_path, record_property):
    """Real interpreters (launch.local.spawn, hooks named as strings), two emulated nodes so
    bytes cross nodes through /dev/shm staging areas; rank 1 dies at its first receive, with its
    area open. Survivors exit with status 2 and the error on stderr (no traceback) within the
    bound, and nothing of the load remains in /dev/shm."""
    from weightcast.launch.local import spawn
    env = dict(os.environ, WC_FAULT="kill-on-recv@1:transfer", WC_MARK=str(tmp_path),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    args = {"source": ckpt, "timeout": TIMEOUT, "transport": "node-shared", "chunk_bytes": 128,
            "phase_hook": "tests.faults:phase_hook", "reader_factory": "tests.faults:reader_factory"}
    results = spawn(3, "tests.faults:timed_load_job", args, nodes=["a", "b", "b"], env=env, check=False, grace=30,
                    timeout=120)
    returned = time.time()
    death = _death(tmp_path)
    assert death["rank"] == 1 and results[1].returncode == -9
    assert death["areas"], "rank 1 died before creating its staging area: the test proves nothing"
    delays = []
    for r in (results[0], results[2]):
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"rank {r.rank}: LoadError: Lost contact with rank 1 during the load" in r.stderr
        assert "Traceback" not in r.stderr
        with open(tmp_path / f"error-{r.rank}.json") as fh:
            delays.append(round(json.load(fh)["time"] - death["time"], 3))
    assert all(0 <= d < BOUND for d in delays), delays
    assert returned - death["time"] < BOUND + 15  # every survivor has exited, not been killed
    record_property("death_to_error_s", delays)
    print(f"\ndeath-to-error node-shared real processes: {delays} s; all exited after "
          f"{returned - death['time']:.1f} s")
    load_id = os.path.basename(death["areas"][0]).split("-")[1]
    assert [p for p in os.listdir("/dev/shm") if p.startswith(f"weightcast-{load_id}-")] == []
    assert faults.stray_processes() == []


def test_reclaim_stale_removes_areas_of_dead_loads_only(tmp_path):
    """An area whose holder was killed is reclaimed; one a live process holds is kept."""
    import fcntl
    import multiprocessing
    from weightcast.workers.staging_areas import reclaim_stale
    dead, live = tmp_path / "weightcast-deadload-n0-f0", tmp_path / "weightcast-liveload-n0-f0"
    ready = multiprocessing.get_context("fork").Event()
    proc = multiprocessing.get_context("fork").Process(target=_hold_area, args=(str(dead), ready))
    proc.start()
    assert ready.wait(30)
    assert reclaim_stale(str(tmp_path)) == []  # held by a live process
    proc.kill()
    proc.join(10)
    fd = os.open(live, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        assert reclaim_stale(str(tmp_path)) == [str(dead)]
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)


def _hold_area(path: str, ready) -> None:
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    ready.set()
    time.sleep(600)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))


def test_control_groups_kept_after_success_and_replaced_after_failure(ckpt):
    """Loads in one process group: a load that ended well leaves its control groups for the next
    (same objects, no new gloo group); a failed load destroys them, and the load after it makes
    new ones; a different timeout never reuses groups made for another."""
    outs = faults.run_ranks(3, _group_sequence, _load_args(ckpt), user_group=True, timeout=120)
    assert [o.exitcode for o in outs] == [0, 0, 0], [o.error for o in outs]
    for o in outs:
        crcs, kept = o.value
        assert all(c == crcs[0] for c in crcs if c is not None) and crcs[2] is None, crcs
        # kept ids after: load 1, load 2 (same), failed load (none), load 4 (new), load 5 (other timeout)
        assert kept[0] is not None and kept[1] == kept[0], kept
        assert kept[2] is None, kept
        assert kept[3] is not None and kept[3] != kept[0], kept
        assert kept[4] is not None and kept[4] != kept[3], kept


def _group_sequence(args: dict) -> list:
    from weightcast.workers import process_group
    crcs, kept, held = [], [], []
    for i, timeout in enumerate([TIMEOUT, TIMEOUT, TIMEOUT, TIMEOUT, TIMEOUT + 1]):
        os.environ.pop("WC_FAULT", None)
        if i == 2:
            os.environ["WC_FAULT"] = "raise@1:transfer"
        try:
            crcs.append(faults.load_scenario({**args, "timeout": timeout}))
        except Exception:  # noqa: BLE001 - the injected failure
            crcs.append(None)
        kept.append(id(process_group._KEPT[0][2]) if process_group._KEPT else None)
        # keep the ids meaningful: hold every kept group so no id is reused by a new one
        held.extend(g for e in process_group._KEPT for g in e[2:])
    os.environ.pop("WC_FAULT", None)
    return [crcs, kept]
