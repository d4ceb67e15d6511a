"""Planner tests: property tests on random inputs (a pure-Python replay of every plan), golden
small plans, balance on synthetic Llama checkpoints, JSON determinism and input errors."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightcast.orchestrator.checkpoint import CheckpointIndex
from weightcast.orchestrator.device_map import ClusterDeviceMap, Place, Replicate, Shard
from weightcast.orchestrator.errors import ConfigError, DeviceMapError, PlanError
from weightcast.orchestrator.planner import (LoadPlan, PlanOptions, node_cross_bytes, owned_of, plan_from_json,
                                  plan_load, plan_to_json, rank_owned_bytes, rank_read_bytes,
                                  rank_recv_bytes)
from tests.plan_fixtures import make_cluster, make_index, replicate_map, tp_map
from tests.plan_replay import check_plan, check_ring, required

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- random inputs

DTYPES = {"U8": 1, "F16": 2, "F32": 4}


@st.composite
def planner_inputs(draw):  # type: ignore[no-untyped-def]
    nodes = draw(st.integers(1, 3))
    per_node = draw(st.lists(st.integers(1, 3), min_size=nodes, max_size=nodes))
    storage = draw(st.sampled_from(["shared", "node-local"]))
    cluster = make_cluster(nodes, per_node, storage=storage,
                           device=draw(st.sampled_from(["cuda", "cpu"])))
    world = cluster.world_size
    n = draw(st.integers(1, 7))
    shapes = [tuple(draw(st.lists(st.integers(0, 5), max_size=3))) for _ in range(n)]
    dtypes = {f"t{i}": draw(st.sampled_from(sorted(DTYPES))) for i in range(n)}
    index = make_index([(f"t{i}", s) for i, s in enumerate(shapes)],
                       shard_bytes=draw(st.integers(1, 200)), header=draw(st.integers(0, 9)),
                       dtypes=dtypes)
    placements = {}
    ranks_st = st.lists(st.integers(0, world - 1), unique=True)
    for t in index.tensors:
        kind = draw(st.sampled_from(["replicate", "place", "shard"]))
        if kind == "replicate":
            placements[t.name] = Replicate(tuple(draw(ranks_st)))
        elif kind == "place":
            placements[t.name] = Place(draw(st.integers(0, world - 1)),
                                       draw(st.sampled_from(["cpu", "cuda:0", "disk"])))
        else:
            perm = draw(st.permutations(range(world)))
            k = draw(st.integers(1, world))
            cuts = sorted(draw(st.lists(st.integers(1, k - 1), unique=True))) if k > 1 else []
            bounds = [0, *cuts, k]
            groups = tuple(tuple(perm[a:b]) for a, b in zip(bounds, bounds[1:]))
            ndim = max(1, len(t.shape))
            placements[t.name] = Shard(draw(st.integers(-ndim, ndim - 1)), groups)
    options = PlanOptions(transport=draw(st.sampled_from(["collective", "node-shared"])),
                          chunk_bytes=draw(st.integers(1, 64)),
                          bucket_bytes=draw(st.integers(1, 128)),
                          gap_bytes=draw(st.sampled_from([0, 0, 3, 50])))
    return index, cluster, ClusterDeviceMap(placements), options


@SETTINGS
@given(planner_inputs())
def test_random_plans_deliver_exactly_what_each_owner_needs(inputs) -> None:  # type: ignore[no-untyped-def]
    index, cluster, dm, options = inputs
    plan = plan_load(index, cluster, dm, options)
    check_plan(plan, index, cluster, dm)
    blob = plan_to_json(plan)
    assert plan_to_json(plan_load(index, cluster, dm, options)) == blob
    again = plan_from_json(blob)
    assert again == plan and plan_to_json(again) == blob
    check_ring(plan)
    owned = rank_owned_bytes(plan, {t.name: t.length for t in index.tensors})
    need = required(index, dm, cluster.world_size)
    for r in range(cluster.world_size):  # a scatter slice is the rank's share of the tensor
        assert owned[r] <= sum(len(p) for p, _ in need[r].values())


def test_ring_link_loads_are_balanced() -> None:
    index = make_index([(f"w{i}", (1024, 1024)) for i in range(40)], shard_bytes=1 << 30)
    for nodes, per in ((4, 2), (3, 4), (5, 1)):
        cluster = make_cluster(nodes, per, device="cpu")
        plan = plan_load(index, cluster, replicate_map(index, cluster),
                         PlanOptions(transport="node-shared", chunk_bytes=1 << 19,
                                     bucket_bytes=1 << 20))
        check_ring(plan)
        links: dict[tuple, int] = {}
        node_of = {r: n for n, ranks in plan.nodes for r in ranks}
        for t in plan.transfers:
            n = sum(plan.chunks[c].length for c in t.chunks)
            for key in ((node_of[t.src], t.src % per, "out"),
                        (node_of[t.dsts[0]], t.dsts[0] % per, "in")):
                links[key] = links.get(key, 0) + n
        loads = list(links.values())
        assert len(loads) == 2 * nodes * per
        assert max(loads) <= 1.10 * min(loads), (nodes, per, links)
        cross = node_cross_bytes(plan)
        total = sum(t.length for t in index.tensors)
        for node, (sent, recv) in cross.items():
            assert recv == total - sum(c.length for c in plan.chunks if node_of[c.reader] == node)


def test_ring_skips_nodes_that_need_nothing() -> None:
    index = make_index([("a", (8, 4)), ("b", (8, 4)), ("c", (2,))], dtype="F32")
    cluster = make_cluster(4, 1, device="cpu")
    dm = ClusterDeviceMap({"a": Replicate((0, 2)), "b": Replicate((1, 3)), "c": Place(2)})
    plan = plan_load(index, cluster, dm, PlanOptions(transport="node-shared"))
    check_plan(plan, index, cluster, dm)
    check_ring(plan)
    assert [(t.src, t.dsts) for t in plan.transfers] == [(0, (2,)), (1, (3,))]
    assert node_cross_bytes(plan) == {"node0": (128, 0), "node1": (128, 0), "node2": (0, 128),
                                      "node3": (0, 128)}


# ---------------------------------------------------------------- golden small plans

F = "model-00000.safetensors"
GOLDEN_OPTIONS = dict(chunk_bytes=16, bucket_bytes=32)


def golden_index() -> CheckpointIndex:
    # a: 32 bytes at 16..48, b: 8 bytes at 48..56, c: 32 bytes at 56..88
    return make_index([("a", (4, 2)), ("b", (2,)), ("c", (2, 4))], dtype="F32", header=8)


def _plan(dm: dict, nodes: int = 1, per_node: int = 2, **opts: object) -> LoadPlan:
    index = golden_index()
    cluster = make_cluster(nodes, per_node, device="cpu")
    cdm = ClusterDeviceMap(dm)
    plan = plan_load(index, cluster, cdm, PlanOptions(**{**GOLDEN_OPTIONS, **opts}))
    check_plan(plan, index, cluster, cdm)
    assert plan_from_json(plan_to_json(plan)) == plan
    return plan


def test_golden_replicate() -> None:
    from weightcast.orchestrator.planner import Chunk, Owned, ReadItem, TransferItem
    plan = _plan({n: Replicate((0, 1)) for n in "abc"})
    assert plan.chunks == (Chunk(0, "a", F, 16, 16, 0, 0, (0, 1)), Chunk(1, "a", F, 32, 16, 16, 1, (0, 1)),
                           Chunk(2, "b", F, 48, 8, 0, 0, (0, 1)), Chunk(3, "c", F, 56, 16, 0, 0, (0, 1)),
                           Chunk(4, "c", F, 72, 16, 16, 1, (0, 1)))
    assert plan.reads == (ReadItem(0, F, 16, 16, (0,)), ReadItem(0, F, 48, 24, (2, 3)),
                          ReadItem(1, F, 32, 16, (1,)), ReadItem(1, F, 72, 16, (4,)))
    assert plan.transfers == (TransferItem("broadcast", 0, (1,), (0, 2), 0, 0, 0),
                              TransferItem("broadcast", 1, (0,), (1, 4), 1, 0, 0),
                              TransferItem("broadcast", 0, (1,), (3,), 2, 0, 1))
    assert list(plan.owned) == [Owned(r, n, "F32", s, None, 0, s[0], "cpu")
                                for r in (0, 1) for n, s in (("a", (4, 2)), ("b", (2,)), ("c", (2, 4)))]
    assert (plan.world_size, plan.nodes, plan.storage, plan.devices) == (
        2, (("node0", (0, 1)),), "shared", ("cpu", "cpu"))
    assert (plan.checkpoint_bytes, plan.needed_bytes) == (72, 72)
    assert rank_read_bytes(plan) == [40, 32] and rank_recv_bytes(plan) == [32, 40]
    assert rank_owned_bytes(plan) == [72, 72]


def test_golden_tp() -> None:
    from weightcast.orchestrator.planner import Chunk, Owned, ReadItem, TransferItem
    plan = _plan({"a": Shard(0, ((0, 1),)), "b": Replicate((0, 1)), "c": Shard(1, ((0, 1),))})
    assert plan.chunks == (Chunk(0, "a", F, 16, 16, 0, 0, (0,)), Chunk(1, "a", F, 32, 16, 16, 1, (1,)),
                           Chunk(2, "b", F, 48, 8, 0, 1, (0, 1)), Chunk(3, "c", F, 56, 16, 0, 0, (0, 1)),
                           Chunk(4, "c", F, 72, 16, 16, 0, (0, 1)))
    assert plan.reads == (ReadItem(0, F, 16, 16, (0,)), ReadItem(0, F, 56, 32, (3, 4)),
                          ReadItem(1, F, 32, 24, (1, 2)))
    assert plan.transfers == (TransferItem("broadcast", 1, (0,), (2,), 0, 0, 0),
                              TransferItem("scatter", 0, (1,), (3, 4), 1, 0, 0))
    assert list(plan.owned) == [
        Owned(0, "a", "F32", (4, 2), 0, 0, 2, "cpu"), Owned(0, "b", "F32", (2,), None, 0, 2, "cpu"),
        Owned(0, "c", "F32", (2, 4), 1, 0, 2, "cpu"), Owned(1, "a", "F32", (4, 2), 0, 2, 4, "cpu"),
        Owned(1, "b", "F32", (2,), None, 0, 2, "cpu"), Owned(1, "c", "F32", (2, 4), 1, 2, 4, "cpu")]
    assert rank_read_bytes(plan) == [48, 24] and rank_recv_bytes(plan) == [8, 16]
    assert rank_owned_bytes(plan) == [16 + 8 + 16] * 2


def test_golden_explicit_places() -> None:
    from weightcast.orchestrator.planner import Chunk, Owned, ReadItem
    plan = _plan({"a": Place(0), "b": Place(1, "cpu"), "c": Place(1, "disk")})
    assert plan.chunks == (Chunk(0, "a", F, 16, 16, 0, 0, (0,)), Chunk(1, "a", F, 32, 16, 16, 0, (0,)),
                           Chunk(2, "b", F, 48, 8, 0, 1, (1,)), Chunk(3, "c", F, 56, 16, 0, 1, (1,)),
                           Chunk(4, "c", F, 72, 16, 16, 1, (1,)))
    assert plan.reads == (ReadItem(0, F, 16, 32, (0, 1)), ReadItem(1, F, 48, 40, (2, 3, 4)))
    assert plan.transfers == ()
    assert list(plan.owned) == [Owned(0, "a", "F32", (4, 2), None, 0, 4, "cpu"),
                                Owned(1, "b", "F32", (2,), None, 0, 2, "cpu"),
                                Owned(1, "c", "F32", (2, 4), None, 0, 2, "disk")]


def test_golden_node_shared_two_nodes() -> None:
    from weightcast.orchestrator.planner import TransferItem
    plan = _plan({n: Replicate((0, 1)) for n in "abc"}, nodes=2, per_node=1,
                 transport="node-shared")
    assert [c.reader for c in plan.chunks] == [0, 1, 0, 0, 1]
    # node 0's stream (40 bytes) fills 32-byte buckets; node 1's (32 bytes) fits one bucket, so
    # it is cut into quarters (one chunk each here) and reading and the ring overlap
    assert plan.transfers == (TransferItem("hop", 0, (1,), (0, 2), 0, 0, 0),
                              TransferItem("hop", 1, (0,), (1,), 1, 0, 0),
                              TransferItem("hop", 0, (1,), (3,), 2, 0, 1),
                              TransferItem("hop", 1, (0,), (4,), 3, 0, 1))
    small = _plan({n: Replicate((0, 1)) for n in "abc"}, nodes=2, per_node=1, transport="node-shared",
                  bucket_bytes=1 << 20)
    assert small.transfers == (TransferItem("hop", 0, (1,), (0,), 0, 0, 0),
                               TransferItem("hop", 1, (0,), (1,), 1, 0, 0),
                               TransferItem("hop", 0, (1,), (2,), 2, 0, 1),
                               TransferItem("hop", 1, (0,), (4,), 3, 0, 1),
                               TransferItem("hop", 0, (1,), (3,), 4, 0, 2))
    assert node_cross_bytes(plan) == {"node0": (40, 32), "node1": (32, 40)}


def test_golden_ring_of_three_nodes() -> None:
    from weightcast.orchestrator.planner import TransferItem
    index = make_index([("w", (4,))], dtype="F32")
    cluster = make_cluster(3, 1, device="cpu")
    dm = replicate_map(index, cluster)
    plan = plan_load(index, cluster, dm, PlanOptions(transport="node-shared"))
    assert plan.transfers == (TransferItem("hop", 0, (1,), (0,), 0, 0, 0),
                              TransferItem("hop", 1, (2,), (0,), 0, 1, 1))


def test_golden_node_local_collective() -> None:
    index = golden_index()
    cluster = make_cluster(2, 1, storage="node-local", device="cpu")
    dm = ClusterDeviceMap({"a": Replicate((0, 1)), "b": Place(1), "c": Shard(0, ((0, 1),))})
    plan = plan_load(index, cluster, dm, PlanOptions(**GOLDEN_OPTIONS))
    check_plan(plan, index, cluster, dm)
    assert [(c.tensor, c.offset, c.length, c.reader, c.consumers) for c in plan.chunks] == [
        ("a", 16, 16, 0, (0,)), ("a", 16, 16, 1, (1,)), ("a", 32, 16, 0, (0,)),
        ("a", 32, 16, 1, (1,)), ("b", 48, 8, 1, (1,)), ("c", 56, 16, 0, (0,)),
        ("c", 72, 16, 1, (1,))]
    assert plan.transfers == () and rank_read_bytes(plan) == [48, 56]
    assert plan.needed_bytes == 72


# ---------------------------------------------------------------- balance and scale

@pytest.mark.parametrize("like,nodes,per,transport", [
    ("llama-8b", 1, 8, "collective"), ("llama-8b", 2, 4, "node-shared"),
    ("llama-70b", 16, 8, "collective"), ("llama-70b", 16, 8, "node-shared"),
    ("llama-405b", 4, 8, "collective")])
def test_replicate_read_balance(like: str, nodes: int, per: int, transport: str) -> None:
    from tests.plan_fixtures import llama_index
    index = llama_index(like)
    cluster = make_cluster(nodes, per)
    plan = plan_load(index, cluster, replicate_map(index, cluster), PlanOptions(transport=transport))
    read = rank_read_bytes(plan)
    assert sum(read) == plan.needed_bytes == index.total_bytes
    assert max(read) <= 1.05 * sum(read) / len(read)
    node_read = [sum(read[r] for r in ranks) for _, ranks in plan.nodes]
    assert max(node_read) <= 1.05 * sum(node_read) / len(node_read)


def test_405b_on_128x8_plans_read_once() -> None:
    from tests.plan_fixtures import llama_index
    index = llama_index("llama-405b")
    cluster = make_cluster(128, 8)
    for dm in (replicate_map(index, cluster), tp_map(index, cluster)):
        plan = plan_load(index, cluster, dm)
        assert sum(rank_read_bytes(plan)) == plan.needed_bytes == index.total_bytes
        assert len(owned_of(plan, 1000)) == len(index.tensors)
        assert len(plan.owned) == len(index.tensors) * 1024
        blob = plan_to_json(plan)
        assert len(blob) < 8 << 20 and plan_from_json(blob).chunks == plan.chunks


def test_tp_slices_are_read_by_their_owners() -> None:
    from tests.plan_fixtures import llama_index
    index = llama_index("llama-8b")
    cluster = make_cluster(2, 4)
    plan = plan_load(index, cluster, tp_map(index, cluster))
    q = [c for c in plan.chunks if c.tensor == "model.layers.0.self_attn.q_proj.weight"]
    assert {c.consumers for c in q} == {(0, 4), (1, 5), (2, 6), (3, 7)}
    assert all(c.reader in c.consumers for c in q)
    kinds = {t.kind for t in plan.transfers}
    assert kinds == {"send", "scatter", "broadcast"}
    sizes = [sum(plan.chunks[c].length for c in t.chunks) for t in plan.transfers]
    singles = [t for t, n in zip(plan.transfers, sizes) if n > plan.options.bucket_bytes]
    assert all(t.kind == "scatter" for t in singles)  # only whole tensors exceed a bucket


# ---------------------------------------------------------------- input errors

def test_uncovered_and_unknown_tensors_are_named() -> None:
    index = golden_index()
    cluster = make_cluster(1, 2)
    with pytest.raises(DeviceMapError, match="does not place 1 tensor.*Got: c"):
        plan_load(index, cluster, ClusterDeviceMap({"a": Place(0), "b": Place(0)}))
    with pytest.raises(DeviceMapError, match="not in the checkpoint.*zz"):
        plan_load(index, cluster, ClusterDeviceMap({"a": Place(0), "b": Place(0), "c": Place(0),
                                                    "zz": Place(1)}))


@pytest.mark.parametrize("placement,message", [
    (Place(2), "outside the cluster"), (Replicate((0, 5)), "outside the cluster"),
    (Shard(2, ((0, 1),)), "dim out of range"), (Shard(0, ((0, 1), (1,))), "twice"),
    (Shard(0, ((),)), "empty shard group")])
def test_bad_placements(placement: object, message: str) -> None:
    dm = ClusterDeviceMap({"a": placement, "b": Place(0), "c": Place(0)})
    with pytest.raises(DeviceMapError, match=message) as info:
        plan_load(golden_index(), make_cluster(1, 2), dm)
    assert "'a'" in str(info.value)


@pytest.mark.parametrize("options,message", [
    (PlanOptions(transport="auto"), "unknown transport"), (PlanOptions(chunk_bytes=0), "chunk_bytes"),
    (PlanOptions(bucket_bytes=-1), "bucket_bytes"), (PlanOptions(gap_bytes=-1), "gap_bytes")])
def test_bad_options(options: PlanOptions, message: str) -> None:
    index = golden_index()
    cluster = make_cluster(1, 2)
    with pytest.raises(ConfigError, match=message):
        plan_load(index, cluster, replicate_map(index, cluster), options)


def test_rows_that_are_not_whole_bytes_are_refused() -> None:
    from weightcast.orchestrator.checkpoint import FileEntry, TensorEntry
    index = CheckpointIndex("/x", (FileEntry(F, 8 + 8 + 3, 1, 16),),
                            (TensorEntry("p", F, "F4", (2, 3), 16, 3),))  # 1.5-byte rows
    with pytest.raises(PlanError, match="whole number of rows"):
        plan_load(index, make_cluster(1, 2), ClusterDeviceMap({"p": Shard(0, ((0, 1),))}))


def test_bad_blobs_raise_plan_errors() -> None:
    with pytest.raises(PlanError, match="not JSON"):
        plan_from_json(b"\xff{")
    with pytest.raises(PlanError, match="version"):
        plan_from_json(b'{"format": "weightcast-plan", "version": 99}')
    blob = plan_to_json(_plan({n: Replicate((0, 1)) for n in "abc"}))
    with pytest.raises(PlanError, match="inconsistent"):
        plan_from_json(blob.replace(b'"rank_sets":[', b'"rank_sets":[[0],'))


def test_json_keeps_any_transfer_order_and_plain_owned_tuples() -> None:
    import dataclasses
    plan = _plan({n: Replicate((0, 1)) for n in "abc"}, nodes=2, per_node=1,
                 transport="node-shared")
    odd = dataclasses.replace(plan, transfers=plan.transfers[::-1], owned=tuple(plan.owned))
    again = plan_from_json(plan_to_json(odd))
    assert again.transfers == plan.transfers[::-1] and list(again.owned) == list(plan.owned)
    assert plan_to_json(again) == plan_to_json(odd)
    assert rank_owned_bytes(odd) == rank_owned_bytes(plan) and owned_of(odd, 1) == owned_of(plan, 1)


def test_collective_rounds_hold_each_sources_kth_bucket() -> None:
    from tests.plan_fixtures import llama_index
    index = llama_index("llama-8b")
    cluster = make_cluster(2, 4)
    plan = plan_load(index, cluster, tp_map(index, cluster))
    assert [t.bucket for t in plan.transfers] == list(range(len(plan.transfers)))
    assert [t.round for t in plan.transfers] == sorted(t.round for t in plan.transfers)
    seen: dict[int, list[int]] = {}
    for t in plan.transfers:
        seen.setdefault(t.src, []).append(t.round)
        assert list(t.chunks) == sorted(t.chunks)
    for rounds in seen.values():
        assert rounds == list(range(len(rounds)))


def test_plan_json_is_identical_across_processes() -> None:
    import os
    import subprocess
    import sys
    code = ("import hashlib, sys; sys.path.insert(0, '.')\n"
            "from tests.plan_fixtures import llama_index, make_cluster, tp_map\n"
            "from orchestrator.planner import PlanOptions, plan_load, plan_to_json\n"
            "idx = llama_index('llama-tiny'); cl = make_cluster(3, [4, 2, 3])\n"
            "for tr in ('collective', 'node-shared'):\n"
            "    plan = plan_load(idx, cl, tp_map(idx, cl), PlanOptions(transport=tr, chunk_bytes=999))\n"
            "    print(hashlib.sha256(plan_to_json(plan)).hexdigest())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                           timeout=120, check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert len(outs) == 1 and len(next(iter(outs)).split()) == 2
