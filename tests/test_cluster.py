"""ClusterSpec from YAML files, flags and run-time facts; validation; dict/JSON round trip."""
from __future__ import annotations

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightcast.orchestrator.cluster import (ClusterSpec, RankSpec, cluster_from_dict, cluster_from_facts,
                                  cluster_from_flags, cluster_from_json, cluster_to_dict,
                                  cluster_to_json, load_cluster, parse_bytes)
from weightcast.orchestrator.errors import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "cluster_configs"
GIB = 1024**3

SHIPPED = {  # file -> (world size, nodes, ranks per node, first device, device memory, storage)
    "local-cpu-2.yaml": (2, 1, 2, "cpu", 25276510208 // 2, "shared"),
    "local-cpu-4.yaml": (4, 1, 4, "cpu", 25276510208 // 4, "shared"),
    "1x8-h100.yaml": (8, 1, 8, "cuda:0", 80 * GIB, "node-local"),
    "16x8-h100.yaml": (128, 16, 8, "cuda:0", 80 * GIB, "shared"),
    "128x8-h100.yaml": (1024, 128, 8, "cuda:0", 80 * GIB, "shared"),
    "emu-2n.yaml": (2, 2, 1, "cpu", 8 * GIB, "shared"),
    "emu-4n.yaml": (4, 4, 1, "cpu", 8 * GIB, "shared"),
}


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*SHIPPED, "hetero-example.yaml"])


@pytest.mark.parametrize("fname", sorted(SHIPPED))
def test_shipped_regular_configs(fname):
    world, n_nodes, per_node, device, mem, storage = SHIPPED[fname]
    spec = load_cluster(CONFIGS / fname)
    assert spec.name == fname[:-5]
    assert spec.world_size == world and len(spec.nodes) == n_nodes and spec.storage == storage
    for node in spec.nodes:
        assert spec.local_world_size(node) == per_node
    assert spec.ranks[0].device == device and spec.ranks[0].device_memory == mem
    last = spec.ranks[-1]
    assert (last.rank, last.local_rank) == (world - 1, per_node - 1)
    assert last.device == ("cpu" if device == "cpu" else f"cuda:{per_node - 1}")
    assert spec.storage_gbps > 0 and spec.inter_node_gbps > 0
    assert cluster_from_json(cluster_to_json(spec)) == spec


def test_hetero_config():
    spec = load_cluster(CONFIGS / "hetero-example.yaml")
    assert spec.nodes == ("h100-0", "h100-1", "a100-0")
    assert spec.world_size == 20 and spec.ranks_on("a100-0") == (16, 17, 18, 19)
    assert spec.ranks[16].device == "cuda:0" and spec.ranks[16].device_memory == 40 * GIB
    assert spec.ranks[15].device == "cuda:7" and spec.ranks[15].device_memory == 80 * GIB
    assert spec.ranks[19].host_memory == 1024 * GIB and spec.storage_total_gbps == 12.0
    assert cluster_from_dict(cluster_to_dict(spec)) == spec


def test_local_cpu_numbers_are_this_machines_measurements():
    spec = load_cluster(CONFIGS / "local-cpu-2.yaml")
    assert (spec.storage_gbps, spec.intra_node_gbps, spec.memcpy_gbps, spec.first_touch_gbps) \
        == (2.5, 3.0, 12.0, 2.2)


BASE = """\
storage: shared
storage_gbps: 2
nodes:
  count: 2
  gpus_per_node: 2
  device_memory: 16GB
  host_memory: 64GB
"""

BAD_YAML = [  # (text, words the message must contain)
    ("nodes: [\n", ["not valid YAML"]),
    ("", ["empty"]),
    ("- 1\n- 2\n", ["Expected a mapping"]),
    (BASE + "storge: shared\n", ["'storge'", "did you mean 'storage'"]),
    (BASE.replace("storage: shared", "storage: nfs"), ["storage", "'nfs'", "node-local"]),
    (BASE.replace("storage_gbps: 2", "storage_gbps: -1"), ["storage_gbps", "positive"]),
    (BASE.replace("storage_gbps: 2", "storage_gbps: fast"), ["storage_gbps", "'fast'"]),
    (BASE.replace("  count: 2\n", ""), ["count"]),
    (BASE.replace("count: 2", "count: 0"), ["'count'", ">= 1"]),
    (BASE.replace("gpus_per_node", "gpu_per_node"), ["'gpu_per_node'", "gpus_per_node"]),
    (BASE.replace("  gpus_per_node: 2\n", ""), ["gpus", "ranks"]),
    (BASE + "  ranks_per_node: 2\n", ["exactly one of gpus"]),
    (BASE.replace("  device_memory: 16GB\n", ""), ["device_memory"]),
    (BASE.replace("16GB", "16 parsecs"), ["device_memory", "16 parsecs", "GiB"]),
    (BASE.replace("  host_memory: 64GB\n", ""), ["Missing key 'host_memory'"]),
    (BASE.replace("host_memory: 64GB", "host_memory: -5"), ["host_memory", "negative"]),
    ("nodes: []\n", ["non-empty list"]),
    ("nodes:\n  - gpus: 2\n    device_memory: 1GB\n    host_memory: 2GB\n", ["'name' or 'count'"]),
    ("nodes:\n  - {name: a, gpus: 1, device_memory: 1GB, host_memory: 2GB}\n"
     "  - {name: a, gpus: 1, device_memory: 1GB, host_memory: 2GB}\n", ["Duplicate node name", "'a'"]),
    ("nodes:\n  - {name: a, gpus: 1, device: cpu, device_memory: 1GB, host_memory: 2GB}\n",
     ["device", "'cpu'"]),
    ("nodes:\n  - {name: a, gpus: 1, device_memory: 1GB, host_memory: 2GB}\n"
     "ranks: []\n", ["exactly one of 'nodes' or 'ranks'"]),
    ("name: 3\n" + BASE, ["'name'", "non-empty string"]),
]


@pytest.mark.parametrize("text,words", BAD_YAML)
def test_bad_yaml_catalogue(tmp_path, text, words):
    with pytest.raises(ConfigError) as exc:
        load_cluster(write(tmp_path, text))
    for word in words:
        assert word in str(exc.value), (word, str(exc.value))


def test_missing_file_is_a_config_error_listing_the_shipped_names(tmp_path):
    for missing in (tmp_path / "nope.yaml", "16x8-a100", "cluster_configs/16x8-h100"):
        with pytest.raises(ConfigError, match="not found") as exc:
            load_cluster(missing)
        assert "16x8-h100, 1x8-h100" in str(exc.value) and "Fix:" in str(exc.value)


def test_shipped_configs_are_found_by_name(tmp_path, monkeypatch):
    """A name that is not an existing file is looked up among the shipped configurations
    (as ``weightcast plan --cluster 16x8-h100`` does outside a checkout); a file wins."""
    monkeypatch.chdir(tmp_path)
    by_file = load_cluster(CONFIGS / "16x8-h100.yaml")
    assert load_cluster("16x8-h100") == by_file == load_cluster("16x8-h100.yaml")
    (tmp_path / "16x8-h100.yaml").write_text("nodes: {count: 1, ranks_per_node: 2, host_memory: 8GiB}\n")
    assert load_cluster("16x8-h100.yaml").world_size == 2
    assert load_cluster("16x8-h100").world_size == 128


def test_count_form_and_cpu_defaults(tmp_path):
    spec = load_cluster(write(tmp_path, "nodes: {count: 2, ranks_per_node: 3, host_memory: 30GB}\n"))
    assert spec.name == "c" and spec.world_size == 6 and spec.nodes == ("node0", "node1")
    assert [r.device for r in spec.ranks] == ["cpu"] * 6
    assert spec.ranks[4] == RankSpec(4, 1, "node1", "cpu", 10 * 10**9, 30 * 10**9)
    assert spec.storage_total_gbps is None


def test_ranks_with_cuda_device_and_explicit_list(tmp_path):
    spec = load_cluster(write(tmp_path, (
        "nodes:\n  - {name: x, ranks: 2, device: cuda, device_memory: 1.5GB, host_memory: 1TB}\n"
        "  - {count: 2, name_prefix: y, gpus: 1, device_memory: 1024, host_memory: 1TiB}\n")))
    assert [(r.node, r.device, r.device_memory) for r in spec.ranks] == [
        ("x", "cuda:0", 1_500_000_000), ("x", "cuda:1", 1_500_000_000),
        ("y0", "cuda:0", 1024), ("y1", "cuda:0", 1024)]


@pytest.mark.parametrize("text,expected", [
    (1234, 1234), ("1234", 1234), ("2KB", 2000), ("2KiB", 2048), ("1.5GB", 1_500_000_000),
    ("80GiB", 80 * GIB), ("1TB", 10**12), (" 3 mib ", 3 * 2**20), (80e9, 80_000_000_000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text, where="x") == expected


@pytest.mark.parametrize("bad", ["", "GB", "1.2.3GB", "12 XB", True, None, [1], -1, 1.5])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError):
        parse_bytes(bad, where="x")


def test_flags():
    spec = cluster_from_flags(3, 4, device_memory="40GiB")
    assert spec.world_size == 12 and spec.nodes == ("node0", "node1", "node2")
    assert spec.ranks[9] == RankSpec(9, 1, "node2", "cuda:1", 40 * GIB, 2 * 1024 * GIB)
    assert spec.name == "3x4-gpu"
    cpu = cluster_from_flags(1, 2, cpu=True, device_memory=10**9, host_memory=4 * 10**9,
                             bandwidths={"storage_gbps": 5.0}, storage="node-local")
    assert cpu.devices == ("cpu", "cpu") and cpu.storage_gbps == 5.0 and cpu.storage == "node-local"
    with pytest.raises(ConfigError, match="--nodes"):
        cluster_from_flags(0, 8)
    with pytest.raises(ConfigError, match="stroage_gbps"):
        cluster_from_flags(1, 1, bandwidths={"stroage_gbps": 1.0})


def fact(rank, local, host, device=None, mem=10**9, hostmem=10**10):
    return {"rank": rank, "local_rank": local, "host": host,
            "device": device or f"cuda:{local}", "device_memory": mem, "host_memory": hostmem}


def test_facts_orders_nodes_by_lowest_rank():
    facts = [fact(3, 1, "b"), fact(0, 0, "b"), fact(2, 0, "a"), fact(1, 1, "a")]
    spec = cluster_from_facts(facts)
    assert spec.nodes == ("b", "a") and spec.ranks_on("b") == (0, 3) and spec.ranks_on("a") == (2, 1)
    assert spec.ranks[3] == RankSpec(3, 1, "b", "cuda:1", 10**9, 10**10)
    assert cluster_from_json(cluster_to_json(spec)) == spec  # irregular: stored rank by rank
    assert "ranks" in cluster_to_dict(spec)


def test_facts_take_bandwidths_from_template():
    template = load_cluster(CONFIGS / "16x8-h100.yaml")
    spec = cluster_from_facts([fact(0, 0, "h"), fact(1, 1, "h")], template=template)
    assert spec.storage_total_gbps == 48.0 and spec.name == "16x8-h100"


def test_facts_allow_one_visible_gpu_per_process():
    spec = cluster_from_facts([fact(0, 0, "h", "cuda:0"), fact(1, 1, "h", "cuda:0")])
    assert spec.devices == ("cuda:0", "cuda:0")


@pytest.mark.parametrize("facts,words", [
    ([fact(0, 0, "a"), fact(2, 1, "a")], ["0..N-1", "[0, 2]"]),
    ([fact(0, 0, "a"), fact(0, 1, "a")], ["0..N-1"]),
    ([fact(0, 0, "a"), fact(1, 0, "a")], ["Local ranks", "'a'"]),
    ([fact(0, 0, "a"), fact(1, 0, "b", "cuda:1")], ["local to its node", "'cuda:1'", "global rank"]),
    ([fact(0, 0, "a", "gpu0")], ["Unknown device", "'gpu0'"]),
    ([fact(0, 0, "a", "cuda:01")], ["Unknown device"]),
    ([fact(0, 0, "a", mem=0)], ["device_memory", "positive"]),
    ([fact(0, 0, "a"), fact(1, 1, "a", hostmem=5)], ["host memory"]),
    ([{**fact(0, 0, "a"), "gpu": 1}], ["Unknown key 'gpu'"]),
    ([{k: v for k, v in fact(0, 0, "a").items() if k != "local_rank"}], ["'local_rank'"]),
    ([{**fact(0, 0, "a"), "rank": "0"}], ["'rank'", "integer"]),
    ([], ["non-empty"]),
])
def test_bad_facts(facts, words):
    with pytest.raises(ConfigError) as exc:
        cluster_from_facts(facts)
    for word in words:
        assert word in str(exc.value), (word, str(exc.value))


def test_spec_is_validated_on_construction():
    with pytest.raises(ConfigError, match="storage"):
        ClusterSpec(ranks=(RankSpec(0, 0, "n", "cpu", 1, 1),), storage="s3")
    with pytest.raises(ConfigError, match="at least one rank"):
        ClusterSpec(ranks=())
    with pytest.raises(ConfigError, match="inter_node_gbps"):
        ClusterSpec(ranks=(RankSpec(0, 0, "n", "cpu", 1, 1),), inter_node_gbps=0)


@st.composite
def clusters(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    cpu = draw(st.booleans())
    ranks, rank = [], 0
    for n, size in enumerate(sizes):
        host = draw(st.integers(1, 2**44))
        for j in range(size):
            dev = "cpu" if cpu else f"cuda:{draw(st.integers(0, size - 1))}"
            ranks.append(RankSpec(rank, j, f"n{n}", dev, draw(st.integers(1, 2**40)), host))
            rank += 1
    return ClusterSpec(ranks=tuple(ranks), storage=draw(st.sampled_from(["shared", "node-local"])),
                       storage_total_gbps=draw(st.none() | st.floats(0.5, 500)),
                       name=draw(st.text("abc-", min_size=1, max_size=5)))


@settings(max_examples=60, deadline=None)
@given(clusters())
def test_json_round_trip(spec):
    assert cluster_from_json(cluster_to_json(spec)) == spec
    assert cluster_to_json(cluster_from_json(cluster_to_json(spec))) == cluster_to_json(spec)
