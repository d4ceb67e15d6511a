"""The local launcher and argument checks: fail fast, name the rank, leave nothing.

``weightcast.launch.local.spawn`` (behind ``weightcast load/save --nproc N``) must notice the
first rank that dies at once, stop the others after a short grace, and name the rank, its signal
and its last phase; no process and no ``$TMPDIR/weightcast-spawn-*`` directory may remain. Every
numeric argument of the CLI and the API is checked before any rank starts (ConfigError, exit 2).
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
import time

import pytest

from tests import faults
from tests.ckpt_factory import sample_tensors, write_sharded

pytestmark = pytest.mark.timeout(300)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE = 3.0  # spawn's default grace for the survivors
BOUND = GRACE + 12.0  # death -> launcher error, generous: 2 shared cores


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt")
    write_sharded(d, sample_tensors(), shards=3)
    return str(d)


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch) -> str:
    """This test's own $TMPDIR (other jobs on the machine make spawn directories too)."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return str(d)


def _spawn_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "weightcast-spawn-*")))


def _env(tmp_path, **kw) -> dict:
    return dict(os.environ, WC_MARK=str(tmp_path), PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
                **kw)


@pytest.mark.parametrize("rank, where, transport", [(1, "start-up", "collective"), (0, "start-up", "collective"),
                                                     (1, "start-up", "node-shared"), (1, "plan", "collective"),
                                                     (2, "transfer", "collective")])
def test_first_death_is_named_at_once(ckpt, tmp_path, rank: int, where: str, transport: str,
                                      record_property) -> None:
    """A rank SIGKILLed at start-up (before joining: the others wait in the rendezvous), while
    planning or mid-transfer: spawn raises a LoadError naming that rank, SIGKILL and the phase
    within the grace + a few seconds, the survivors stopped or exited, nothing left behind."""
    from weightcast.launch.local import spawn
    from weightcast.orchestrator.errors import LoadError
    fault = {"WC_KILL_AT_START": str(rank)} if where == "start-up" else {"WC_FAULT": f"kill@{rank}:{where}"}
    before = _spawn_dirs()
    args = {"source": ckpt, "timeout": 60, "transport": transport, "chunk_bytes": 128,
            "phase_hook": "tests.faults:phase_hook"}
    nodes = ["a", "b", "c"] if transport == "node-shared" else None
    with pytest.raises(LoadError) as info:
        spawn(3, "tests.faults:timed_load_job", args, env=_env(tmp_path, **fault), nodes=nodes, timeout=120)
    ended = time.time()
    with open(tmp_path / "death.json") as fh:
        death = json.load(fh)
    msg = str(info.value)
    assert death["rank"] == rank
    assert f"Rank {rank} of the local job was killed by SIGKILL during {where}" in msg, msg
    assert "exit status -9" not in msg
    delay = ended - death["time"]
    record_property("death_to_launcher_error_s", round(delay, 3))
    print(f"\nrank {rank} killed during {where} ({transport}): launcher error after {delay:.2f} s")
    assert delay < BOUND, delay
    assert _spawn_dirs() == before
    assert faults.stray_processes() == []


def test_results_of_every_rank_and_no_spawn_dir(ckpt) -> None:
    """A load that works: every rank's value comes back, the temporary directory is gone."""
    from weightcast.launch.local import spawn
    before = _spawn_dirs()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    results = spawn(2, "weightcast.launch.jobs:load_job", {"source": ckpt, "timeout": 60, "verify": True}, env=env,
                    timeout=120)
    assert [r.returncode for r in results] == [0, 0]
    assert all(r.value["mismatches"] == [] and r.phase == "exit" for r in results)
    assert _spawn_dirs() == before


BAD_CLI = [
    (["--nproc", "0"], "Invalid number of local ranks"),
    (["--nproc", "-3"], "Invalid number of local ranks"),
    (["--nproc", "100000"], "Invalid number of local ranks"),
    (["--timeout", "0"], "Invalid --timeout"),
    (["--timeout", "-1"], "Invalid --timeout"),
    (["--timeout", "nan"], "Invalid --timeout"),
    (["--timeout", "inf"], "Invalid --timeout"),
    (["--threads", "0"], "Invalid --threads"),
    (["--tp-size", "0"], "Invalid --tp-size"),
]


@pytest.mark.parametrize("command", ["load", "save"])
@pytest.mark.parametrize("argv, message", BAD_CLI)
def test_cli_bad_arguments_exit_2_before_any_rank(ckpt, tmp_path, capsys, command, argv, message) -> None:
    from weightcast.launch.cli import main
    if command == "save" and argv[0] == "--threads":
        argv = ["--nproc", "0"]
        message = "Invalid number of local ranks"
    before = _spawn_dirs()
    t0 = time.monotonic()
    extra = [str(tmp_path / "out")] if command == "save" else []
    assert main([command, ckpt, *extra, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Expected:" in err and "Traceback" not in err, err
    assert time.monotonic() - t0 < 5  # refused before any rank started
    assert _spawn_dirs() == before and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kw, message", [
    ({"timeout": 0}, "Invalid timeout"), ({"timeout": -1.0}, "Invalid timeout"),
    ({"timeout": float("nan")}, "Invalid timeout"), ({"timeout": "300"}, "Invalid timeout"),
    ({"bucket_bytes": 0}, "Invalid bucket_bytes"), ({"chunk_bytes": -1}, "Invalid chunk_bytes"),
    ({"chunk_bytes": 1.5}, "Invalid chunk_bytes"), ({"threads": 0}, "Invalid threads"),
    ({"threads": 10_000}, "Invalid threads"),
])
def test_api_bad_arguments_raise_config_error(ckpt, kw, message) -> None:
    from weightcast.orchestrator.errors import ConfigError
    from weightcast.workers.api import load_pretrained
    with pytest.raises(ConfigError, match=message):
        load_pretrained(ckpt, model=None, **kw)


def test_save_bad_timeout(tmp_path) -> None:
    import torch
    from weightcast.orchestrator.errors import ConfigError
    from weightcast.workers.save import save_pretrained
    with pytest.raises(ConfigError, match="Invalid timeout"):
        save_pretrained({"w": torch.zeros(2)}, tmp_path / "out", timeout=-5)
    assert not os.path.exists(tmp_path / "out")


def test_spawn_refuses_bad_nproc() -> None:
    from weightcast.launch.local import max_local_ranks, spawn
    from weightcast.orchestrator.errors import ConfigError
    for bad in (0, -1, max_local_ranks() + 1, 2.0):
        with pytest.raises(ConfigError, match="Invalid number of local ranks"):
            spawn(bad, "x:y", {})
