"""``save_training_state`` from 2 ranks (DDP and FSDP2): the Trainer layout, files equal to what
Trainer wrote, Trainer resumes from it; a rank killed mid-save leaves the previous checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile

import pytest
import torch

from tests.test_torchrun import torchrun
from tests.test_training_state import SCRIPT
from tests.ranks import spawn  # forked ranks: see tests/ranks.py

pytestmark = pytest.mark.timeout(600)  # the first test also runs the session's Trainer job


def _same_state(saved_dir: str, original: str) -> None:
    from safetensors.torch import load_file
    a = torch.load(os.path.join(saved_dir, "optimizer.pt"), weights_only=True)
    b = torch.load(os.path.join(original, "optimizer.pt"), weights_only=True)
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, st in b["state"].items():
        for k, v in st.items():
            assert a["state"][i][k].dtype == v.dtype and torch.equal(a["state"][i][k], v), (i, k)
    assert zipfile.ZipFile(os.path.join(saved_dir, "optimizer.pt")).testzip() is None  # CRC-32 of every member
    w1, w2 = load_file(os.path.join(saved_dir, "model.safetensors")), load_file(os.path.join(original, "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w2)
    assert torch.load(os.path.join(saved_dir, "scheduler.pt"), weights_only=True) == \
        torch.load(os.path.join(original, "scheduler.pt"), weights_only=True)
    state = json.load(open(os.path.join(saved_dir, "trainer_state.json")))
    assert state["global_step"] == 2
    assert {"rng_state_0.pth", "rng_state_1.pth", "config.json"} <= set(os.listdir(saved_dir))


def test_save_from_ddp_then_trainer_resumes(trainer_checkpoint, tmp_path) -> None:
    checkpoint = trainer_checkpoint
    out = str(tmp_path / "saved")
    spawn(2, "tests.training_jobs:resume_and_save", {"checkpoint": checkpoint, "out": out}, timeout=200)
    _same_state(out, checkpoint)
    run = tmp_path / "resumed"
    proc = torchrun([SCRIPT, "resume", str(run), out], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    original = json.load(open(os.path.join(os.path.dirname(checkpoint), "losses_0.json")))["losses"]
    assert json.load(open(run / "losses_0.json"))["losses"]["3"] == original["3"]


def test_save_from_fsdp_writes_the_full_state(trainer_checkpoint, tmp_path) -> None:
    """Each rank writes its rows of every sharded state into one optimizer.pt (no gather)."""
    checkpoint = trainer_checkpoint
    out = str(tmp_path / "saved")
    spawn(2, "tests.training_jobs:resume_and_save", {"checkpoint": checkpoint, "out": out, "fsdp": True},
          timeout=250)
    _same_state(out, checkpoint)


def _digest(directory: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(directory))}


def test_rank_killed_mid_save_keeps_previous_checkpoint(trainer_checkpoint, tmp_path) -> None:
    checkpoint = trainer_checkpoint
    out = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, out)
    before = _digest(str(out))
    results = spawn(2, "tests.training_jobs:resume_and_save",
                    {"checkpoint": checkpoint, "out": str(out), "kill_rank": 1}, timeout=200, check=False, grace=90)
    assert results[1].returncode != 0 and results[0].returncode != 0
    assert results[0].value is not None and "error" in results[0].value, results[0].stderr[-2000:]
    assert _digest(str(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # the staging directory was removed


def _steps(stdout: str) -> dict[int, str]:
    return {int(line.split()[1]): line.split()[3] for line in stdout.splitlines() if line.startswith("step ")}


def test_example_fsdp_loop_resumes_where_it_stopped(tmp_path) -> None:
    """examples/torchrun_fsdp_train.py: 4 steps saving at 2 and 4; resumed from checkpoint-2, steps 3
    and 4 have the uninterrupted run's losses (printed to 6 decimals)."""
    from tests.ckpt_factory import save_tiny_llama
    save_tiny_llama(tmp_path / "llama", tied=False)
    example = os.path.join("examples", "torchrun_fsdp_train.py")
    first = torchrun([example, str(tmp_path / "llama"), str(tmp_path / "run"), "--steps", "4"], timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(tmp_path / "run"))
    again = torchrun([example, str(tmp_path / "llama"), str(tmp_path / "again"), "--steps", "4",
                      "--resume", str(tmp_path / "run" / "checkpoint-2")], timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    full, resumed = _steps(first.stdout), _steps(again.stdout)
    assert sorted(resumed) == [3, 4] and all(resumed[s] == full[s] for s in (3, 4)), (full, resumed)
