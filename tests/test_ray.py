"""Ray: ``load_on_ray`` on a local Ray instance (2 rank actors, one CPU left free), the
``device_map="auto"`` pipeline example, and ``ray job submit`` against a head this test starts
on 127.0.0.1 and stops by PID."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from tests.ckpt_factory import save_tiny_llama
from tests.test_torchrun import checkpoint_tensor_bytes

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("llama")
    save_tiny_llama(d, max_shard_size="100KB")
    return str(d)


@pytest.fixture(scope="module")
def ray_local():
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old


def _wait_released(group, cpus: float = 3.0, timeout: float = 60.0) -> None:
    """After shutdown: every actor process gone, the placement group removed, the CPUs free."""
    import psutil
    from ray.util import placement_group_table
    deadline = time.monotonic() + timeout
    pids = [info["pid"] for info in group.infos]
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        free = ray.available_resources().get("CPU", 0.0)
        if not alive and free == cpus:
            break
        time.sleep(0.5)
    assert not alive, f"rank actors still running: {alive}"
    assert free == cpus
    assert placement_group_table(group.placement_group)["state"] == "REMOVED"


def test_load_on_ray_two_ranks_bit_exact(ray_local, llama: str) -> None:
    from weightcast.orchestrator.errors import ConfigError
    from weightcast.launch.ray import load_on_ray
    group = load_on_ray(llama, ranks_per_node=2, timeout=120, model=None)
    try:
        node = ray.get_runtime_context().get_node_id()
        assert [e["RANK"] for e in group.envs] == ["0", "1"] and [e["LOCAL_RANK"] for e in group.envs] == ["0", "1"]
        assert all(e["WORLD_SIZE"] == "2" == e["LOCAL_WORLD_SIZE"] and e["WEIGHTCAST_NODE"] == node for e in group.envs)
        assert group.envs[0]["MASTER_ADDR"] == group.infos[0]["ip"] and int(group.envs[0]["MASTER_PORT"]) > 0

        def compare(model, root):
            from safetensors.torch import load_file
            want = {}
            for f in os.listdir(root):
                if f.endswith(".safetensors"):
                    want.update(load_file(os.path.join(root, f)))
            same = [n for n, t in model.items() if t.dtype == want[n].dtype and torch.equal(t, want[n])]
            return {"rank": os.environ["RANK"], "same": len(same), "owned": len(model), "all": len(want)}

        results = group.run(compare, llama)
        assert [r["rank"] for r in results] == ["0", "1"]
        assert all(r["same"] == r["owned"] == r["all"] for r in results)  # replicated, bit for bit
        expected = checkpoint_tensor_bytes(llama)
        assert sum(r["read_bytes"] for r in group.report["ranks"]) == expected == group.report["checkpoint_bytes"]
    finally:
        group.shutdown()
    _wait_released(group)
    with pytest.raises(ConfigError):
        group.run(len)


def test_ray_actors_auto_pipeline(ray_local, llama: str) -> None:
    from examples.ray_actors_auto import run_example
    found = run_example(llama, ranks=2, timeout=180)
    assert found["same"], found
    held = found["held"]
    assert "embed_tokens" in held[0] and "norm" in held[-1] and held[0] != held[1]  # a real split
    assert found["read_bytes"] == checkpoint_tensor_bytes(llama)


def test_load_error_reaches_the_driver_and_frees_everything(ray_local, tmp_path) -> None:
    from weightcast.orchestrator.errors import WeightcastError
    from weightcast.launch.ray import load_on_ray
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # truncated header
    with pytest.raises(WeightcastError) as info:
        load_on_ray(str(tmp_path), ranks_per_node=2, timeout=60, model=None)
    assert "model.safetensors" in str(info.value)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) != 3.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == 3.0


def test_unplaceable_group_fails_within_timeout(ray_local, llama: str) -> None:
    from weightcast.orchestrator.errors import LoadError
    from weightcast.launch.ray import load_on_ray
    t0 = time.monotonic()
    with pytest.raises(LoadError, match="could not place"):
        load_on_ray(llama, ranks_per_node=4, timeout=5)  # 4 CPUs asked, 3 in the cluster
    assert time.monotonic() - t0 < 60
    time.sleep(1)
    assert ray.available_resources().get("CPU") == 3.0


def test_cluster_yaml_gives_layout_and_node_names(ray_local, llama: str) -> None:
    from weightcast.launch.ray import load_on_ray
    yaml = os.path.join(REPO, "cluster_configs", "local-cpu-2.yaml")
    with load_on_ray(llama, cluster=yaml, timeout=120, model=None) as group:
        assert group.world_size == 2
        assert [e["WEIGHTCAST_NODE"] for e in group.envs] == ["local0", "local0"]
        assert {r["node"] for r in group.report["ranks"]} == {"local0"}
        assert group.report["total_read_bytes"] == checkpoint_tensor_bytes(llama)
    _wait_released(group)


def test_rank_envs_number_ranks_node_by_node_with_ray_gpus() -> None:
    """Bundles alternate between two nodes: ranks are consecutive per node, and each actor sees
    its node's Ray GPU ids in local-rank order, so cuda:<local rank> is the GPU Ray gave it."""
    from weightcast.orchestrator.cluster import load_cluster
    from weightcast.orchestrator.errors import ConfigError
    from weightcast.launch.ray import check_layout, rank_envs
    infos = [{"node_id": "A", "gpu_ids": ["5"]}, {"node_id": "B", "gpu_ids": ["0"]},
             {"node_id": "A", "gpu_ids": ["2"]}, {"node_id": "B", "gpu_ids": ["7"]}]
    envs, order = rank_envs(infos)
    assert order == [0, 2, 1, 3]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WEIGHTCAST_NODE"]) for e in envs] == [
        ("0", "0", "A"), ("1", "1", "A"), ("2", "0", "B"), ("3", "1", "B")]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["5,2", "5,2", "0,7", "0,7"]
    for env, i in zip(envs, order):  # the local rank indexes the actor's own Ray GPU
        assert env["CUDA_VISIBLE_DEVICES"].split(",")[int(env["LOCAL_RANK"])] == infos[i]["gpu_ids"][0]
    assert all(e["WORLD_SIZE"] == "4" and e["LOCAL_WORLD_SIZE"] == "2" for e in envs)
    named, _ = rank_envs(infos, ["node0", "node1"])
    assert [e["WEIGHTCAST_NODE"] for e in named] == ["node0", "node0", "node1", "node1"]
    spec = load_cluster(os.path.join(REPO, "cluster_configs", "local-cpu-4.yaml"))
    with pytest.raises(ConfigError, match="differently"):
        check_layout(spec, infos, order)


def test_bad_layouts_are_refused() -> None:
    from weightcast.orchestrator.errors import ConfigError
    from weightcast.launch.ray import load_on_ray
    with pytest.raises(ConfigError, match="STRICT_PACK"):
        load_on_ray("x", num_nodes=2, strategy="STRICT_PACK")
    with pytest.raises(ConfigError, match="STRICT_SPREAD"):
        load_on_ray("x", num_nodes=2, ranks_per_node=2, strategy="STRICT_SPREAD")
    with pytest.raises(ConfigError, match="one GPU"):
        load_on_ray("x", gpus_per_node=2, ranks_per_node=3)
    with pytest.raises(ConfigError, match="strategy"):
        load_on_ray("x", strategy="pack")


# ---------------------------------------------------------------- ray job submit

def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _head_env() -> dict[str, str]:
    bindir = os.path.dirname(sys.executable)  # the job's `python` is the venv's
    return dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
                PATH=bindir + os.pathsep + os.environ.get("PATH", ""))


def _start_head(temp_dir: str) -> tuple[subprocess.Popen, int]:
    """``ray start --head --block`` on 127.0.0.1 with every port chosen free; returns the process
    and the dashboard (job API) port once the job API answers."""
    gcs, dash, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = _free_ports(9)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--num-cpus", "3", "--temp-dir", temp_dir, "--disable-usage-stats",
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(env_agent), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr)]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=_head_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from ray.job_submission import JobSubmissionClient
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(os.path.join(temp_dir, "head.log")).read()[-3000:]
        try:
            JobSubmissionClient(f"http://127.0.0.1:{dash}").list_jobs()
            return proc, dash
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise AssertionError("the Ray head did not come up in 180 s")


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop this test's head only: SIGTERM to `ray start --block` (it stops what it started), then
    SIGKILL whatever of its process tree or its temp dir is left, by PID."""
    import psutil
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    leftovers = alive + [p for p in psutil.process_iter(["cmdline"])
                         if temp_dir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]
    for p in leftovers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=30)


@pytest.mark.slow
def test_ray_job_submit(llama: str, tmp_path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient
    temp_dir = tempfile.mkdtemp(prefix="wcray", dir="/tmp")  # short: Ray's socket paths are limited
    proc, dash = _start_head(temp_dir)
    try:
        report = tmp_path / "report.json"
        address = f"http://127.0.0.1:{dash}"
        # examples/ray_job_submit.sh runs `ray job submit --address ... --working-dir . -- python -m
        # launch.ray_job CHECKPOINT ...` from the repository root, then `ray job status`
        cmd = [os.path.join(REPO, "examples", "ray_job_submit.sh"), llama, "--ranks-per-node", "2",
               "--verify", "--report", str(report)]
        env = dict(_head_env(), RAY_ADDRESS=address, RAY=os.path.join(os.path.dirname(sys.executable), "ray"))
        done = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=400)
        client = JobSubmissionClient(address)
        jobs = client.list_jobs()
        assert len(jobs) == 1, (done.stdout + done.stderr)[-4000:]
        status, logs = client.get_job_status(jobs[0].submission_id), client.get_job_logs(jobs[0].submission_id)
        assert status == JobStatus.SUCCEEDED and done.returncode == 0, \
            f"{status}\n--- submit ---\n{(done.stdout + done.stderr)[-3000:]}\n--- job log ---\n{logs[-3000:]}"
        assert f"job {jobs[0].submission_id}: SUCCEEDED" in done.stdout
        expected = checkpoint_tensor_bytes(llama)
        assert f"storage bytes read: {expected:,} (checkpoint {expected:,})" in logs
        assert "identical to safetensors" in logs and "2 ranks on 1 node(s)" in logs
        assert json.loads(report.read_text())["total_read_bytes"] == expected
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
