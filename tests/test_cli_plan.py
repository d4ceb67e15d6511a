"""``weightcast plan``: JSON and table output, every cluster/device-map source, saved files,
errors (exit 2, message on stderr, no traceback)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from weightcast.launch.cli import main  # noqa: E402
from weightcast.orchestrator.synth import write_synthetic  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "cluster_configs")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("plan") / "tiny")
    write_synthetic(out, like="tiny", max_shard_size="200KB")
    return out


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_replicate_reads_each_byte_once(ckpt: str, capsys: pytest.CaptureFixture) -> None:
    out = run_json(capsys, ckpt, "--nodes", "2", "--cpus-per-node", "2",
                   "--device-map", "replicate", "--simulate", "--chunk-size", "64KiB")
    assert out["world_size"] == 4 and out["transport"] == "node-shared"
    ck = out["checkpoint_bytes"]
    assert out["needed_bytes"] == out["total_read_bytes"] == ck > 0
    assert out["naive_read_bytes"] == 4 * ck
    ranks = out["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert [r["node"] for r in ranks] == ["node0", "node0", "node1", "node1"]
    assert {r["device"] for r in ranks} == {"cpu"}
    assert sum(r["read_bytes"] for r in ranks) == ck
    assert all(r["owned_bytes"] == ck for r in ranks)
    # node-shared: each node receives (on its rail ranks) what the other node read
    node0 = sum(r["read_bytes"] for r in ranks[:2])
    assert sum(r["recv_bytes"] for r in ranks[:2]) == ck - node0
    assert 0 < out["lower_bound_seconds"] <= out["predicted_seconds"]
    assert all(r["predicted_seconds"] <= out["predicted_seconds"] for r in ranks)


def test_tp_on_gpus_with_saved_device_map_and_plan(ckpt: str, tmp_path: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    from weightcast.orchestrator.device_map import Shard, device_map_from_json
    from weightcast.orchestrator.planner import plan_from_json, rank_read_bytes
    dm_path, plan_path = str(tmp_path / "dm.json"), str(tmp_path / "plan.json")
    out = run_json(capsys, ckpt, "--nodes", "1", "--gpus-per-node", "2", "--device-map", "tp",
                   "--save-device-map", dm_path, "--save-plan", plan_path)
    assert out["transport"] == "collective" and out["device_map"] == "tp"
    assert [r["device"] for r in out["ranks"]] == ["cuda:0", "cuda:1"]
    assert out["total_read_bytes"] == out["needed_bytes"] == out["checkpoint_bytes"]
    dm = device_map_from_json(open(dm_path, "rb").read())
    assert any(isinstance(p, Shard) for p in dm.placements.values())
    plan = plan_from_json(open(plan_path, "rb").read())
    assert rank_read_bytes(plan) == [r["read_bytes"] for r in out["ranks"]]
    # the saved map is accepted back as FILE.json and gives the same plan
    again = run_json(capsys, ckpt, "--nodes", "1", "--gpus-per-node", "2",
                     "--device-map", dm_path)
    assert again["ranks"] == out["ranks"]


def test_cluster_file_and_storage_override(ckpt: str, capsys: pytest.CaptureFixture) -> None:
    path = os.path.join(CONFIGS, "local-cpu-4.yaml")
    out = run_json(capsys, ckpt, "--cluster", path, "--device-map", "replicate",
                   "--transport", "collective")
    assert out["world_size"] == 4 and out["transport"] == "collective"
    assert sum(r["recv_bytes"] for r in out["ranks"]) == 3 * out["checkpoint_bytes"]
    local = run_json(capsys, ckpt, "--nodes", "2", "--cpus-per-node", "1",
                     "--storage", "node-local", "--device-map", "replicate")
    assert local["storage"] == "node-local"
    assert local["total_read_bytes"] == 2 * local["needed_bytes"]
    assert all(r["recv_bytes"] == 0 for r in local["ranks"])


def test_auto_with_max_memory_spreads_layers(ckpt: str, capsys: pytest.CaptureFixture) -> None:
    out = run_json(capsys, ckpt, "--nodes", "2", "--gpus-per-node", "1", "--device-map", "auto")
    owned = [r["owned_bytes"] for r in out["ranks"]]
    assert sum(owned) == out["checkpoint_bytes"]  # every tensor placed once
    assert out["total_read_bytes"] == out["checkpoint_bytes"]
    assert all(r["recv_bytes"] == 0 for r in out["ranks"])  # each reads what it owns
    small = out["checkpoint_bytes"] // 3
    capped = run_json(capsys, ckpt, "--nodes", "2", "--gpus-per-node", "1", "--device-map",
                      "auto", "--max-memory", f"0={small},1={small},cpu=10GB")
    assert capped["ranks"][0]["owned_bytes"] > 0 and capped["ranks"][1]["owned_bytes"] > 0


def test_human_table(ckpt: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", ckpt, "--nodes", "1", "--cpus-per-node", "2", "--device-map",
                 "replicate", "--simulate"]) == 0
    text = capsys.readouterr().out
    assert "rank" in text and "received" in text and "tensors" in text
    assert "1.000 x checkpoint" in text and "naive (every rank reads everything)" in text
    assert "= 2.0 x more" in text and "predicted load time" in text and "lower bound" in text
    assert len([line for line in text.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2


@pytest.mark.parametrize("argv,message", [
    (["--nodes", "2"], "cluster is not described"),
    (["--cluster", "/nonexistent.yaml"], "nonexistent"),
    (["--nodes", "1", "--cpus-per-node", "2", "--device-map", "/nonexistent.json"], "nonexistent"),
    (["--nodes", "1", "--cpus-per-node", "2", "--max-memory", "0="], "--max-memory"),
    (["--nodes", "1", "--cpus-per-node", "2", "--chunk-size", "lots"], "chunk-size"),
])
def test_errors_exit_2_without_traceback(ckpt: str, capsys: pytest.CaptureFixture,
                                         argv: list[str], message: str) -> None:
    assert main(["plan", ckpt, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_checkpoint_exits_2(tmp_path: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(tmp_path / "nope"), "--nodes", "1", "--cpus-per-node", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
