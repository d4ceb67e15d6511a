"""Cost model tests: hand-computed predictions, the emulated-cluster figures, lower bounds."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from weightcast.orchestrator.cost import FIXED_SECONDS, predict, water_fill
from weightcast.orchestrator.device_map import ClusterDeviceMap, Shard
from weightcast.orchestrator.planner import PlanOptions, plan_load
from tests.plan_fixtures import llama_index, make_cluster, make_index, replicate_map, tp_map
from tests.test_planner import planner_inputs

GB = 1e9
MB = 1 << 20


def test_water_fill_shares_the_aggregate_cap() -> None:
    # two nodes at most 3 GB/s each under a 4 GB/s cap: 2 GB/s each until the small one ends
    out = water_fill({"a": 2_000_000_000, "b": 6_000_000_000, "c": 0}, 3e9, 4e9)
    assert out["a"] == pytest.approx(1.0)
    assert out["b"] == pytest.approx(1.0 + 4e9 / 3e9)
    assert out["c"] == 0.0
    assert water_fill({"a": 3_000_000_000}, 3e9, None)["a"] == pytest.approx(1.0)


def test_single_node_collective_replicate() -> None:
    index = make_index([(f"w{i}", (1000, 1000)) for i in range(8)], dtype="U8")  # 8 MB
    cluster = make_cluster(1, 2, device="cpu", storage_gbps=1.0, intra_node_gbps=2.0,
                           first_touch_gbps=4.0)
    plan = plan_load(index, cluster, replicate_map(index, cluster),
                     PlanOptions(chunk_bytes=MB, bucket_bytes=2 * MB))
    p = predict(plan, cluster)
    # both ranks read 4 MB sharing 1 GB/s; each receives 4 MB over 2 GB/s; touches 8 MB at 4 GB/s
    assert p.phases["read"] == pytest.approx(8e6 / GB)
    assert p.phases["transfer"] == pytest.approx(8e6 / 2e9)
    assert p.phases["first_touch"] == pytest.approx(8e6 / 4e9)
    assert p.lower_bound_seconds == pytest.approx(8e6 / GB) and p.bound_by == "storage per node"
    assert p.phases["fixed"] == pytest.approx(FIXED_SECONDS)  # the planning exchange and syncs
    assert p.lower_bound_seconds <= p.total_seconds <= 8e6 / GB + 8e6 / 2e9 + 8e6 / 4e9 + FIXED_SECONDS + 1e-9
    assert p.per_rank_seconds[0] == p.per_rank_seconds[1] == p.total_seconds


def test_emulated_three_node_ring_matches_the_measurement() -> None:
    """Measured on 3 emulated nodes (2 Gbit/s links giving 1.91 Gbit/s, storage capped at
    500 MB/s, 1 GiB): each reads a third, then chunks pass round a ring: 5.16 s."""
    index = make_index([(f"w{i}", (1024, 1024)) for i in range(1024)], dtype="U8",
                       shard_bytes=1 << 30)
    cluster = make_cluster(3, 1, device="cpu", storage_gbps=10.0, storage_total_gbps=0.5,
                           inter_node_gbps=1.91 / 8)
    plan = plan_load(index, cluster, replicate_map(index, cluster),
                     PlanOptions(transport="node-shared", chunk_bytes=8 * MB,
                                 bucket_bytes=32 * MB))
    p = predict(plan, cluster, overlap=False)  # that measurement read first, then ran the ring
    assert p.total_seconds == pytest.approx(5.16, rel=0.05)
    # overlapped (as the workers run it): the ring hides under the reads, bounded by both
    both = predict(plan, cluster)
    assert max(p.phases["read"], p.lower_bound_seconds) <= both.total_seconds < p.total_seconds
    assert p.phases["read"] == pytest.approx((1 << 30) / 0.5e9, rel=0.01)
    assert p.bound_by == "inter-node link"
    assert p.lower_bound_seconds == pytest.approx((2 << 30) / 3 / (1.91e9 / 8), rel=0.01)
    # the collective transport over gloo broadcasts one-to-all: the root's uplink carries
    # two copies, so moving takes about twice as long as the ring
    coll = plan_load(index, cluster, replicate_map(index, cluster),
                     PlanOptions(chunk_bytes=8 * MB, bucket_bytes=32 * MB))
    c = predict(coll, cluster, overlap=False)
    assert c.phases["transfer"] == pytest.approx(2 * (1 << 30) / (1.91e9 / 8), rel=0.02)
    assert c.total_seconds > 1.8 * p.total_seconds


def test_gpu_broadcast_is_a_tree_and_storage_cap_binds_at_scale() -> None:
    index = llama_index("llama-70b")
    cluster = make_cluster(16, 8, storage_gbps=12.0, storage_total_gbps=48.0,
                           intra_node_gbps=250.0, inter_node_gbps=376.0)
    p = predict(plan_load(index, cluster, replicate_map(index, cluster)), cluster)
    total = index.total_bytes
    assert p.bound_by == "storage aggregate"
    assert p.lower_bound_seconds == pytest.approx(total / 48e9)
    assert p.phases["transfer"] == pytest.approx(total / 250e9, rel=0.01)  # NVLink binds
    assert p.phases["first_touch"] == 0.0  # GPU ranks
    assert p.lower_bound_seconds <= p.total_seconds <= 1.2 * p.lower_bound_seconds


def test_node_shared_touches_only_dim1_slices_privately() -> None:
    index = make_index([("a", (8, 1000)), ("b", (1000, 8))], dtype="U8")
    cluster = make_cluster(1, 2, device="cpu", first_touch_gbps=1.0)
    dm = ClusterDeviceMap({"a": Shard(0, ((0, 1),)), "b": Shard(1, ((0, 1),))})
    shared = predict(plan_load(index, cluster, dm, PlanOptions(transport="node-shared")), cluster)
    coll = predict(plan_load(index, cluster, dm), cluster)
    assert shared.phases["first_touch"] == pytest.approx(4000 / 1e9)
    assert coll.phases["first_touch"] == pytest.approx(8000 / 1e9)


def test_tp_prediction_on_16x8_is_finite() -> None:
    index = llama_index("llama-70b")
    cluster = make_cluster(16, 8, storage_gbps=12.0, storage_total_gbps=192.0,
                           intra_node_gbps=250.0, inter_node_gbps=376.0)
    p = predict(plan_load(index, cluster, tp_map(index, cluster)), cluster)
    assert 0 < p.lower_bound_seconds <= p.total_seconds < 1e3
    assert len(p.per_rank_seconds) == 128


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planner_inputs())
def test_prediction_never_beats_its_lower_bound(inputs) -> None:  # type: ignore[no-untyped-def]
    index, cluster, dm, options = inputs
    plan = plan_load(index, cluster, dm, options)
    for overlap in (None, True, False):
        p = predict(plan, cluster, overlap=overlap)
        assert p.lower_bound_seconds <= p.total_seconds * (1 + 1e-9) + 1e-15
        assert all(t >= 0 for t in p.per_rank_seconds)
        assert p.total_seconds == max(p.per_rank_seconds, default=0.0)
