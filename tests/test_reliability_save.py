"""Saves leave nothing: the temporary directory of a save whose ranks all died is reclaimed by
the next save to the same target, never one a live save holds (shared ``flock``)."""
from __future__ import annotations

import fcntl
import os
import signal
import time

import pytest
import torch

from tests import faults
from tests.ckpt_factory import sample_tensors
from tests.test_save import digest, leftovers, read_checkpoint

pytestmark = pytest.mark.timeout(300)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dying_save(args: dict) -> dict:
    """Rank function: every rank holds every tensor and saves; rank 0 SIGKILLs itself once it
    wrote a file, the others once they received the plan: every rank dies mid-save."""
    from datetime import timedelta
    import torch.distributed as dist
    from weightcast.workers.save import save_pretrained
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=30))

    def hook(event: str, detail: str) -> None:
        if (rank == 0 and event == "wrote") or (rank != 0 and event == "planned"):
            os.kill(os.getpid(), signal.SIGKILL)
    save_pretrained(sample_tensors(), args["out"], max_shard_size=200, timeout=30, _fault_hook=hook)
    return {"ok": True}


def test_all_ranks_killed_mid_save_then_a_second_save(tmp_path) -> None:
    from weightcast.launch.local import spawn
    from weightcast.workers.save import save_pretrained
    out = str(tmp_path / "ckpt")
    save_pretrained({"old": torch.ones(3)}, out)
    before = digest(out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    results = spawn(2, "tests.test_reliability_save:dying_save", {"out": out}, env=env, timeout=120, check=False,
                    grace=30)
    assert [r.returncode for r in results] == [-signal.SIGKILL] * 2, [r.stderr[-500:] for r in results]
    dead = leftovers(out)
    assert len(dead) == 1 and ".tmp-" in dead[0] and os.listdir(os.path.join(tmp_path, dead[0])), dead
    assert digest(out) == before  # the previous checkpoint untouched
    # a directory a live save holds (shared lock, as every saving rank takes) is never removed
    live = f"{out}.tmp-livesave0001"
    os.mkdir(live)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        t0 = time.monotonic()
        save_pretrained(sample_tensors(), out, max_shard_size=200)
        print(f"\nsecond save with a reclaim: {time.monotonic() - t0:.2f} s")
        assert leftovers(out) == [os.path.basename(live)]
    finally:
        os.close(fd)
    got = read_checkpoint(out)
    assert got.keys() == sample_tensors().keys()
    assert all(torch.equal(got[k], v) for k, v in sample_tensors().items())
    save_pretrained({"again": torch.zeros(2)}, out)  # unheld now: reclaimed
    assert leftovers(out) == []
    assert faults.stray_processes() == []


def test_parked_checkpoint_is_put_back(tmp_path) -> None:
    """A save that died after parking the previous checkpoint (no atomic exchange) and before
    the swap: the next save puts it back first, then replaces it as usual."""
    from weightcast.workers.save import save_pretrained
    from weightcast.workers.save_fs import reclaim_stale
    out = str(tmp_path / "ckpt")
    save_pretrained({"old": torch.ones(3)}, out)
    os.rename(out, out + ".old-deadsave0001")
    assert reclaim_stale(out) == [] and os.path.isdir(out) and leftovers(out) == []
    assert read_checkpoint(out).keys() == {"old"}
