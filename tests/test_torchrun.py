"""``torchrun ... -m weightcast.launch.torchrun`` and the torchrun examples, in subprocesses (gloo, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.ckpt_factory import save_tiny_llama, write_sharded

pytestmark = pytest.mark.timeout(400)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun_env(extra_path: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, extra_path, env.get("PYTHONPATH")) if p)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240, extra_path: str | None = None
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS`` from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=REPO, env=torchrun_env(extra_path), capture_output=True, text=True,
                          timeout=timeout)


def checkpoint_tensor_bytes(root: str) -> int:
    """Bytes of every tensor in the checkpoint, counted with safetensors (independent of weightcast)."""
    from safetensors.torch import load_file
    return sum(t.numel() * t.element_size() for f in sorted(os.listdir(root)) if f.endswith(".safetensors")
               for t in load_file(os.path.join(root, f)).values())


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("llama")
    save_tiny_llama(d, max_shard_size="100KB")
    return str(d)


def test_verify_and_bytes_read_sum_to_checkpoint(tmp_path, llama: str) -> None:
    user = tmp_path / "userpkg"
    user.mkdir()
    (user / "after_load.py").write_text(textwrap.dedent(f"""
        import json, os
        def record(model, report):
            rank = os.environ["RANK"]
            with open(os.path.join({str(tmp_path)!r}, f"then-{{rank}}.json"), "w") as fh:
                json.dump({{"tensors": sorted(model), "type": type(model).__name__,
                           "world": len(report["ranks"])}}, fh)
    """))
    report_path = tmp_path / "report.json"
    proc = torchrun(["-m", "weightcast.launch.torchrun", llama, "--verify", "--report", str(report_path),
                     "--then", "after_load:record", "--timeout", "60"], extra_path=str(user))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "identical to safetensors" in proc.stdout
    report = json.loads(report_path.read_text())
    expected = checkpoint_tensor_bytes(llama)
    assert report["checkpoint_bytes"] == expected
    assert sum(r["read_bytes"] for r in report["ranks"]) == expected == report["total_read_bytes"]
    assert len(report["ranks"]) == 2 and all(r["read_bytes"] > 0 for r in report["ranks"])
    assert "storage bytes read: " + f"{expected:,}" in proc.stdout
    seen = [json.loads((tmp_path / f"then-{r}.json").read_text()) for r in (0, 1)]
    assert all(s["world"] == 2 and s["type"] == "OwnedTensors" for s in seen)
    assert seen[0]["tensors"] == seen[1]["tensors"] and len(seen[0]["tensors"]) > 10  # replicated


def test_tp_model_verifies_local_shards(tmp_path, llama: str) -> None:
    proc = torchrun(["-m", "weightcast.launch.torchrun", llama, "--model", "auto", "--device-map", "tp",
                     "--verify", "--timeout", "60"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "identical to safetensors" in proc.stdout


def test_load_error_is_exit_2_on_every_rank(tmp_path) -> None:
    write_sharded(tmp_path / "ck", shards=2)
    bad = tmp_path / "ck" / "model-00002-of-00002.safetensors"
    bad.write_bytes(bad.read_bytes()[:-3])  # truncated data region
    proc = torchrun(["-m", "weightcast.launch.torchrun", str(tmp_path / "ck"), "--timeout", "30"], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("rank 0:") == 1 and proc.stderr.count("rank 1:") == 1, proc.stderr[-3000:]
    assert "truncated" in proc.stderr and "model-00002-of-00002.safetensors" in proc.stderr
    # the ranks print the error without a traceback (torchrun's own agent prints one)
    assert "launch/torchrun.py" not in proc.stderr and "workers/" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr


def test_replicate_example(llama: str) -> None:
    proc = torchrun([os.path.join("examples", "torchrun_replicate.py"), llama])
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = checkpoint_tensor_bytes(llama)
    assert f"storage served {expected:,} bytes for a {expected:,}-byte checkpoint" in proc.stdout
    assert "mean loss over 2 data-parallel batches" in proc.stdout
