"""The emulated cluster (benchmarks/cluster_emu): pure parts everywhere; a 2-node emulated load
end to end (network namespaces, shaped links, FUSE storage, torchrun per node) as root only."""
from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from benchmarks.cluster_emu import rank_common, report
from benchmarks.cluster_emu.loaders import LOADERS, unavailable
from benchmarks.cluster_emu.throttle import TokenBucket
from benchmarks.cluster_emu.topology import Topology, cluster_yaml
from weightcast.orchestrator.cluster import cluster_from_dict, load_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- pure parts

def test_topology_names_and_addresses():
    topo = Topology(nodes=4, ranks_per_node=2, subnet="10.201.0.0/24", prefix="wcx-")
    assert topo.node_names == ("wcx-n0", "wcx-n1", "wcx-n2", "wcx-n3")
    assert [topo.addr(k) for k in range(4)] == ["10.201.0.1", "10.201.0.2", "10.201.0.3", "10.201.0.4"]
    assert topo.switch == "wcx-sw" and topo.world_size == 8
    assert topo.view("wcx-n2") == os.path.join(topo.mountpoint, "wcx-n2")
    for bad in ({"subnet": "8.8.8.0/24"}, {"nodes": 0}, {"workdir": "relative"}, {"link_gbit": 0}):
        with pytest.raises(ValueError):
            Topology(**bad)


@pytest.mark.parametrize("nodes", [2, 4])
def test_shipped_configs_are_the_default_topology(nodes):
    """cluster_configs/emu-Nn.yaml is what the harness writes for its default topology, and
    lists the nodes by the names the ranks report (the namespace names)."""
    import yaml
    path = os.path.join(REPO, "cluster_configs", f"emu-{nodes}n.yaml")
    topo = Topology(nodes=nodes)
    with open(path) as f:
        assert yaml.safe_load(f) == yaml.safe_load(cluster_yaml(topo))
    spec = load_cluster(path)
    assert spec.storage == "shared" and spec.nodes == topo.node_names
    assert spec.storage_total_gbps == pytest.approx(0.25)
    assert spec.inter_node_gbps == pytest.approx(2.0 * 0.955 / 8, rel=1e-3)


def test_cluster_yaml_follows_the_topology():
    topo = Topology(nodes=3, ranks_per_node=2, link_gbit=4, storage_mbps=500)
    import yaml
    spec = cluster_from_dict(yaml.safe_load(cluster_yaml(topo, name="x")))
    assert spec.world_size == 6 and spec.nodes == topo.node_names
    assert spec.storage_gbps == pytest.approx(0.5) and spec.inter_node_gbps == pytest.approx(0.4775)


def test_token_bucket_caps_concurrent_readers():
    bucket = TokenBucket(rate=20e6, burst=1 << 16)  # 20 MB/s
    chunk, per_thread = 1 << 18, 8  # 4 threads x 8 x 256 KiB = 8.4 MB -> ~0.42 s at 20 MB/s

    def reader():
        for _ in range(per_thread):
            bucket.take(chunk)
    threads = [threading.Thread(target=reader) for _ in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    elapsed = time.monotonic() - t0
    expected = 4 * per_thread * chunk / 20e6
    assert expected * 0.9 <= elapsed <= expected * 1.6


def test_counter_delta_per_trial():
    before = {"storage_bytes": 100, "storage_clients": {"n0": 100},
              "links": {"p0": {"rx": 10, "tx": 5}, "p1": {"rx": 1, "tx": 2}}}
    after = {"storage_bytes": 400, "storage_clients": {"n0": 250, "n1": 150},
             "links": {"p0": {"rx": 60, "tx": 25}, "p1": {"rx": 31, "tx": 52}}}
    d = rank_common.delta(before, after)
    assert d["storage_bytes"] == 300 and d["storage_clients"] == {"n0": 150, "n1": 150}
    assert d["links"] == {"p0": {"rx": 50, "tx": 20}, "p1": {"rx": 30, "tx": 50}}
    assert d["link_bytes"] == 80  # what the nodes sent


def test_summary_row_and_table():
    topo = Topology(nodes=2)
    trial = {"wall_s": 3.0, "storage_bytes": 2000, "link_bytes": 1000,
             "ranks": [{"peak_rss": 900, "rss_before": 100, "pss": 700}]}
    result = {"trials": [dict(trial, wall_s=w) for w in (3.0, 2.0, 5.0)]}
    row = report.summarize("naive", result, topo, 1000)
    assert (row["wall_min_s"], row["wall_median_s"], row["storage_x"]) == (2.0, 3.0, 2.0)
    assert row["peak_rss_bytes"] == 800
    failed = report.summarize("fst", {"error": "skipped: x"}, topo, 1000)
    table = report.markdown_table([row, failed])
    assert "| naive load_file | 2 x 1 | 2.00 / 3.00 |" in table and "failed: skipped: x" in table
    assert report.baseline_model("naive", topo, 10**9) == pytest.approx(8.0)


def test_predict_reports_a_missing_or_failing_plan(tmp_path):
    pred = report.predict(str(tmp_path / "nowhere"), str(tmp_path / "none.yaml"), "replicate",
                          timeout=120)
    assert "error" in pred and "predicted_s" not in pred


def test_cli_refuses_without_root_or_tools(monkeypatch):
    from benchmarks.cluster_emu import netns
    from benchmarks.cluster_emu.topology import EmulationError
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationError, match="needs root"):
        netns.require_root()
    from benchmarks.cluster_emu import run
    assert run.main(["down", "--workdir", "/tmp/weightcast-emu-test-none"]) == 2


# ---------------------------------------------------------------- end to end (root)

def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces, tc and FUSE mounts"
    from benchmarks.cluster_emu.netns import missing_requirements
    missing = missing_requirements()
    if missing:
        return "missing: " + "; ".join(missing) + " (benchmarks/cluster_emu/setup_deps.sh)"
    for key in ("naive", "wc-replicate"):
        if unavailable(LOADERS[key]):
            return unavailable(LOADERS[key])
    return None


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_two_node_emulated_load(tmp_path):
    """2 nodes x 1 rank: the naive loader makes storage serve the checkpoint once per node;
    weightcast replicate once per cluster (plus page rounding), every tensor bit-exact on every
    rank; nothing is left behind."""
    import torch
    from safetensors.torch import load_file

    from benchmarks.cluster_emu import harness, netns, storage
    from tests.ckpt_factory import write_sharded
    src = tmp_path / "ckpt"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(512, 256, generator=gen).to(torch.bfloat16)
               for i in range(4)}
    write_sharded(src, tensors, shards=2)
    files = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))
    st_bytes = sum(os.path.getsize(src / f) for f in files)
    all_bytes = sum(os.path.getsize(src / f) for f in os.listdir(src))
    expected = {}
    for f in files:
        expected.update(rank_common.digests(load_file(str(src / f))))

    prefix = f"wct{os.getpid() % 100000}-"  # its own namespaces: another run may be going on
    topo = Topology(nodes=2, prefix=prefix, workdir=str(tmp_path / "emu"), subnet="10.201.7.0/24",
                    read_ahead_kb=0, storage_mbps=200)
    yaml_path = str(tmp_path / "emu-2n.yaml")
    with open(yaml_path, "w") as f:
        f.write(cluster_yaml(topo))
    try:
        harness.cluster_up(topo, str(src))
        assert netns.our_namespaces(prefix) == [f"{prefix}n0", f"{prefix}n1", f"{prefix}sw"]
        results = harness.run_loaders(topo, ["naive", "wc-replicate"], str(tmp_path / "out"),
                                      trials=1, cluster_yaml=yaml_path, port=29500,
                                      timeout=480, extra_args=("--verify",))
    finally:
        harness.cluster_down(topo)
    assert netns.our_namespaces(prefix) == []
    assert not storage.is_mounted(topo.mountpoint)

    naive = results["naive"]["trials"][0]
    assert naive["storage_bytes"] == 2 * st_bytes
    assert naive["storage_clients"] == {f"{prefix}n0": st_bytes, f"{prefix}n1": st_bytes}
    wc = results["wc-replicate"]["trials"][0]
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    # every tensor byte once; beyond that only headers, the JSON files and the pages that two
    # nodes' ranges share (buffered reads are page-granular)
    slack = 2 * len(files) * 2 * 4096
    assert tensor_bytes <= wc["storage_bytes"] <= all_bytes + slack, wc["storage_clients"]
    assert set(wc["storage_clients"]) == {f"{prefix}n0", f"{prefix}n1"}
    assert wc["link_bytes"] >= 0.4 * st_bytes  # each node received what the other read
    for trial in (naive, wc):
        for rank in trial["ranks"]:
            assert rank["digests"] == expected
