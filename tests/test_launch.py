"""``weightcast launch --cluster X.yaml``: the per-node torchrun commands, ``--run`` on one node
and on two emulated nodes (static rendezvous on 127.0.0.1), and the two-node node-local storage
emulation where each node reads the checkpoint once, from its own copy."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from weightcast.launch.cli import main as cli_main
from weightcast.launch.local import free_port
from tests.ckpt_factory import save_tiny_llama
from tests.test_torchrun import REPO, checkpoint_tensor_bytes, torchrun_env

pytestmark = pytest.mark.timeout(400)

CONFIGS = os.path.join(REPO, "cluster_configs")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("llama")
    save_tiny_llama(d, max_shard_size="100KB")
    return str(d)


def _commands(capsys, argv: list[str]) -> list[tuple[dict, list[str]]]:
    assert cli_main(["launch", *argv]) == 0
    out = []
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith("#"):
            words = shlex.split(line)
            env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
            out.append((env, [w for w in words if w not in {f"{k}={v}" for k, v in env.items()}]))
    return out


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_commands_for_16_nodes_of_8_gpus(capsys) -> None:
    yaml = os.path.join(CONFIGS, "16x8-h100.yaml")
    cmds = _commands(capsys, ["--cluster", yaml, "/data/ckpt", "--device-map", "tp", "--dtype", "bfloat16",
                              "--verify", "--timeout", "600", "--report", "r.json"])
    assert len(cmds) == 16
    for k, (env, argv) in enumerate(cmds):
        assert argv[0] == "torchrun" and env == {"WEIGHTCAST_NODE": f"node{k}"}
        assert _opt(argv, "--nnodes") == "16" and _opt(argv, "--nproc-per-node") == "8"
        assert _opt(argv, "--node-rank") == str(k) and _opt(argv, "--rdzv-endpoint") == "node0:29500"
        assert _opt(argv, "--rdzv-backend") == "static"
        worker = argv[argv.index("-m") + 1:]
        assert worker[:2] == ["weightcast.launch.torchrun", "/data/ckpt"] and _opt(worker, "--cluster") == yaml
    # what the ranks receive parses to the options given to `weightcast launch`
    from weightcast.launch.cmd_load import job_args
    from weightcast.launch.torchrun import build_parser
    ns = build_parser().parse_args(cmds[3][1][cmds[3][1].index("-m") + 2:])
    assert job_args(ns) == {**job_args(ns), "device_map": "tp", "dtype": "bfloat16", "verify": True,
                            "timeout": 600.0, "cluster": yaml}
    assert ns.report == "r.json"


def test_heterogeneous_nodes_and_hosts(capsys) -> None:
    cmds = _commands(capsys, ["--cluster", os.path.join(CONFIGS, "hetero-example.yaml"), "org/model",
                              "--hosts", "10.0.0.1,10.0.0.2,10.0.0.3", "--port", "4242"])
    assert [_opt(a, "--nproc-per-node") for _, a in cmds] == ["8", "8", "4"]
    assert {_opt(a, "--rdzv-endpoint") for _, a in cmds} == {"10.0.0.1:4242"}
    assert [e["WEIGHTCAST_NODE"] for e, _ in cmds] == ["h100-0", "h100-1", "a100-0"]


def test_one_node_is_standalone(capsys) -> None:
    [(env, argv)] = _commands(capsys, ["--cluster", os.path.join(CONFIGS, "local-cpu-2.yaml"), "ckpt"])
    assert "--standalone" in argv and _opt(argv, "--nproc-per-node") == "2" and "--rdzv-endpoint" not in argv


def test_bad_arguments_exit_2(capsys) -> None:
    hetero = os.path.join(CONFIGS, "hetero-example.yaml")
    assert cli_main(["launch", "ckpt"]) == 2
    assert "needs a cluster YAML" in capsys.readouterr().err
    assert cli_main(["launch", "--cluster", hetero, "ckpt", "--hosts", "a,b"]) == 2
    assert "one address per node" in capsys.readouterr().err
    assert cli_main(["launch", "--cluster", hetero, "ckpt", "--run", "--node", "nowhere"]) == 2
    assert "which node" in capsys.readouterr().err


def test_plan_takes_the_same_yaml(capsys, llama: str) -> None:
    assert cli_main(["plan", llama, "--cluster", os.path.join(CONFIGS, "local-cpu-2.yaml"),
                     "--device-map", "replicate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def _launch(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "weightcast.launch.cli", "launch", *argv], cwd=REPO, env=torchrun_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_one_node(llama: str) -> None:
    proc = _launch(["--cluster", os.path.join(CONFIGS, "local-cpu-2.yaml"), llama, "--verify", "--run"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "identical to safetensors" in out and "local0" in out


def _two_nodes(tmp_path, llama: str) -> tuple[str, dict[str, str]]:
    """Each node's copy in its own directory; n1's copy has different bytes in one tensor (same
    size), so whatever a rank holds shows which copy it was read from."""
    from examples.two_nodes_local_storage import node_copies, write_cluster_yaml
    dirs = node_copies(llama, str(tmp_path))
    yaml = write_cluster_yaml(str(tmp_path / "two-nodes.yaml"))
    with open(os.path.join(dirs["n1"], "model.safetensors.index.json")) as fh:
        last = sorted(set(json.load(fh)["weight_map"].values()))[-1]
    with open(os.path.join(dirs["n1"], last), "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        tail = fh.read(4)
        fh.seek(-4, os.SEEK_END)
        fh.write(bytes(b ^ 0x5A for b in tail))
    return yaml, dirs


def test_two_nodes_node_local_with_torchrun(tmp_path, llama: str) -> None:
    """Two `weightcast launch --run` (one per node, static rendezvous on 127.0.0.1): each node's
    storage serves the checkpoint once, each rank holds its own node's bytes."""
    yaml, _ = _two_nodes(tmp_path, llama)
    report = tmp_path / "report.json"
    common = ["--cluster", yaml, str(tmp_path / "{node}" / "checkpoint"), "--hosts", "127.0.0.1,127.0.0.1",
              "--port", str(free_port()), "--verify", "--run", "--timeout", "120"]
    procs = [_launch([*common, "--node-rank", "1"]), _launch([*common, "--node-rank", "0", "--report", str(report)])]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-3000:] + outs[0][1][-3000:]
    assert "80 owned tensors on 4 ranks identical to safetensors" in outs[1][0]  # each vs its node's copy
    ranks = json.loads(report.read_text())["ranks"]
    total = checkpoint_tensor_bytes(llama)
    assert [r["node"] for r in ranks] == ["n0", "n0", "n1", "n1"]
    for node in ("n0", "n1"):
        assert sum(r["read_bytes"] for r in ranks if r["node"] == node) == total
    assert all(r["cross_node_recv"] == 0 for r in ranks)


@pytest.mark.parametrize("transport", ["node-shared", "collective"])
def test_two_nodes_node_local_with_spawn(tmp_path, llama: str, transport: str) -> None:
    """The same emulation with launch.local.spawn (nodes n0, n0, n1, n1), both transports."""
    from examples.two_nodes_local_storage import run
    _, dirs = _two_nodes(tmp_path, llama)
    found = run(llama, str(tmp_path), transport=transport, copy=False, compare_with=dirs["n0"])
    total = checkpoint_tensor_bytes(llama)
    assert found["checkpoint_bytes"] == total and found["per_node_read"] == {"n0": total, "n1": total}
    for r in found["ranks"]:
        assert r["mismatches"] == [] and r["owned"] > 0 and r["cross_node_recv"] == 0
        assert (r["differs_from_other"] != []) == (r["node"] == "n1")  # n1's ranks hold n1's bytes
