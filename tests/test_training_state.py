"""Resuming a real transformers ``Trainer`` checkpoint (tiny Llama, 2 torchrun ranks, gloo) with
``load_training_state``: bit-identical states, the optimizer file read once per cluster, FSDP2
shards, world-size changes and broken files."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.test_torchrun import torchrun
from tests.ranks import spawn  # forked ranks: see tests/ranks.py

pytestmark = pytest.mark.timeout(600)  # the first test also runs the session's Trainer job
SCRIPT = os.path.join("tests", "trainer_run.py")


@pytest.fixture
def checkpoint(trainer_checkpoint: str) -> str:
    """The session's Trainer checkpoint-2 (tests/conftest.py)."""
    return trainer_checkpoint


def _copy(checkpoint: str, tmp_path, name: str) -> str:
    dest = tmp_path / name
    shutil.copytree(checkpoint, dest)
    return str(dest)


def test_ddp_resume_bit_identical_and_read_once(checkpoint) -> None:
    results = spawn(2, "tests.training_jobs:ddp_resume", {"checkpoint": checkpoint}, timeout=200)
    for r in results:
        v = r.value
        assert v["weights_equal"] and v["opt_state_equal"] and v["param_groups_equal"], v
        assert v["scheduler_equal"] and v["rng"] == {"cpu": True, "python": True, "numpy": True}, v
        assert v["global_step"] == 2
    opt = results[0].value["optimizer_report"]
    size = os.path.getsize(os.path.join(checkpoint, "optimizer.pt"))
    read = sum(r["read_bytes"] for r in opt)
    assert read == opt[0]["tensor_bytes"] <= size  # every tensor byte once (Trainer: 2 x the file)
    assert size - read < 32 << 10  # the rest is zip metadata and data.pkl, read by rank 0 only
    assert all(r["owned_bytes"] == opt[0]["tensor_bytes"] for r in opt)  # DDP: each rank holds it all
    assert results[0].value["weights_read"] == results[0].value["weights_bytes"]


def test_trainer_resume_through_weightcast_equals_trainer(checkpoint, tmp_path) -> None:
    """WeightcastTrainer and Trainer resume checkpoint-2: step 3's loss is the same float."""
    losses = {}
    for mode in ("resume", "resume-weightcast"):
        out = tmp_path / mode
        proc = torchrun([SCRIPT, mode, str(out), checkpoint], timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs = [json.load(open(out / f"losses_{r}.json")) for r in range(2)]
        losses[mode] = runs[0]["losses"]["3"]
        if mode == "resume-weightcast":
            opt_report = runs[0]["weightcast"][1]["optimizer"]
            assert sum(r["read_bytes"] for r in opt_report) == opt_report[0]["tensor_bytes"]
    assert losses["resume"] == losses["resume-weightcast"]


def test_fsdp_resume_shards_equal_reference(checkpoint) -> None:
    results = spawn(2, "tests.training_jobs:fsdp_resume", {"checkpoint": checkpoint}, timeout=250)
    for r in results:
        v = r.value
        assert v["slices_equal"], r.rank
        for ours, ref in v["losses"]:
            assert ours == pytest.approx(ref, rel=1e-6, abs=1e-7)
        assert v["max_diff"] <= 1e-6
    opt = results[0].value["optimizer_report"]
    assert sum(r["read_bytes"] for r in opt) == opt[0]["tensor_bytes"]
    assert max(r["owned_bytes"] for r in opt) < 0.52 * opt[0]["tensor_bytes"]  # each rank: its rows


def _run(checkpoint: str, nproc: int, **kw) -> list:
    return [r.value for r in spawn(nproc, "tests.training_jobs:resume_or_error", {"checkpoint": checkpoint, **kw},
                                   timeout=200)]


def test_world_size_two_to_one(checkpoint) -> None:
    """A 2-rank checkpoint on 1 rank: rng='restore' refuses (naming the fix), rng='skip' resumes."""
    [v] = _run(checkpoint, 1)
    assert v["error"] == "ConfigError" and "rng='skip'" in v["message"] and v["untouched"]
    [v] = _run(checkpoint, 1, rng="skip")
    assert v["error"] is None and v["weights_equal"] and v["opt_steps"] == [2.0] and v["rng_kept"]


def test_world_size_one_to_two(checkpoint, tmp_path) -> None:
    """A 1-process layout (rng_state.pth) on 2 ranks: refused on every rank, or resumed with 'skip'."""
    one = _copy(checkpoint, tmp_path, "one")
    os.rename(os.path.join(one, "rng_state_0.pth"), os.path.join(one, "rng_state.pth"))
    os.remove(os.path.join(one, "rng_state_1.pth"))
    for v in _run(one, 2):
        assert v["error"] == "ConfigError" and "resume with 1 rank" in v["message"] and v["untouched"]
    for v in _run(one, 2, rng="skip"):
        assert v["error"] is None and v["weights_equal"] and v["opt_steps"] == [2.0]


class NotWeights:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "unsafe_pickle", "no_scheduler"])
def test_broken_checkpoint_fails_on_every_rank_untouched(checkpoint, tmp_path, damage: str) -> None:
    bad = _copy(checkpoint, tmp_path, damage)
    opt_path = os.path.join(bad, "optimizer.pt")
    data = open(opt_path, "rb").read()
    if damage == "truncated":
        open(opt_path, "wb").write(data[: len(data) // 2])
    elif damage == "corrupt":
        cd = data.rfind(b"PK\x01\x02")
        open(opt_path, "wb").write(data[:cd] + b"XX" + data[cd + 2:])
    elif damage == "unsafe_pickle":
        saved = torch.load(opt_path, weights_only=True)
        saved["param_groups"][0]["evil"] = NotWeights()
        torch.save(saved, opt_path)
    else:
        os.remove(os.path.join(bad, "scheduler.pt"))
    expected = {"truncated": "CheckpointFormatError", "corrupt": "CheckpointFormatError",
                "unsafe_pickle": "PickleRefusedError", "no_scheduler": "CheckpointNotFoundError"}[damage]
    results = spawn(2, "tests.training_jobs:resume_or_error", {"checkpoint": bad}, timeout=200)
    for r in results:
        assert r.value["error"] == expected, r.value
        assert r.value["untouched"], r.rank


def test_accelerate_save_state_layout(tmp_path) -> None:
    """accelerate's save_state (optimizer.bin, scheduler.bin, random_states_0.pkl) resumes in one
    process: states bit-identical to torch.load of the files, RNG restored."""
    import random

    from accelerate import Accelerator
    from tests.trainer_run import tiny_model
    from weightcast.workers.training_state import load_training_state

    def objects():
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(*objects())
    ids = torch.randint(0, 255, (2, 8))
    acc.backward(model(input_ids=ids, labels=ids).loss)
    opt.step()
    sched.step()
    acc.save_state(str(tmp_path / "acc"))
    torch.manual_seed(123)
    model, opt, sched = objects()
    load_training_state(str(tmp_path / "acc"), model, opt, sched, timeout=60)
    saved = torch.load(tmp_path / "acc" / "optimizer.bin", weights_only=True)
    assert all(torch.equal(opt.state_dict()["state"][i][k], v) for i, st in saved["state"].items()
               for k, v in st.items())
    assert sched.state_dict() == torch.load(tmp_path / "acc" / "scheduler.bin", weights_only=True)
    rng = torch.load(tmp_path / "acc" / "random_states_0.pkl", weights_only=False)  # written by this test
    assert torch.equal(torch.get_rng_state(), rng["torch_manual_seed"]) and random.getstate() == rng["random_state"]
