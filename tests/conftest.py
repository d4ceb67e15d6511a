"""Fixtures shared by several test modules."""
from __future__ import annotations

import os

import pytest

# One SeaweedFS server, its proxy and client for the whole session (tests/s3_fixtures.py): the
# object-storage modules share them instead of starting a server each.
from s3_fixtures import client, proxy, server  # noqa: F401 - fixtures


@pytest.fixture(scope="session")
def trainer_checkpoint(tmp_path_factory) -> str:
    """checkpoint-2 of a real transformers Trainer run (tiny Llama, 2 torchrun ranks on CPU/gloo,
    3 steps, save_steps=2; tests/trainer_run.py), made once per session. Its parent directory holds
    the run's logged losses (losses_<rank>.json)."""
    from tests.test_torchrun import torchrun
    out = tmp_path_factory.mktemp("trainer")
    proc = torchrun([os.path.join("tests", "trainer_run.py"), "train", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = out / "checkpoint-2"
    assert {"optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "model.safetensors",
            "trainer_state.json"} <= set(os.listdir(path))
    return str(path)
