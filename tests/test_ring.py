"""The node-shared ring as a dataflow (workers/ring.py), the order pieces pass in
(orchestrator/ring_order.py), tensors put whole in the staging area (workers/mirror.py), the
per-rank timelines in the report (workers/timeline.py) and the ring's cost model."""
from __future__ import annotations

import pytest
import torch

from tests.ckpt_factory import write_sharded
from tests.plan_fixtures import make_cluster, make_index, replicate_map
from tests.ranks import spawn  # forked ranks: see tests/ranks.py
from weightcast.orchestrator.cost import predict
from weightcast.orchestrator.planner import PlanOptions, plan_load
from weightcast.orchestrator.ring_order import PIECE_BYTES, due, first_hop_bases, pieces_of
from weightcast.workers.mirror import cut, mirror_spans
from weightcast.workers.timeline import Timeline, busy_seconds, merge

pytestmark = pytest.mark.timeout(300)
MB = 1 << 20


# ---------------------------------------------------------------- pure parts

def test_merge_keeps_the_cap_bytes_and_idle_gaps() -> None:
    events = [[i * 0.01, i * 0.01 + 0.009, 100, 1] for i in range(1000)] + [[20.0, 21.0, 7, 1]]
    out = merge(events, 50)
    assert len(out) <= 50
    assert sum(e[2] for e in out) == 100 * 1000 + 7 and sum(e[3] for e in out) == 1001
    assert out[-1] == [20.0, 21.0, 7, 1]  # the long idle gap before it survives
    assert out[0][0] == 0.0 and max(e[1] for e in out) == 21.0
    assert busy_seconds(out) == pytest.approx(busy_seconds(events) + 0.001 * 999, rel=0.01)


def test_timeline_is_relative_to_the_given_start() -> None:
    tl = Timeline(t0=100.0)
    tl.add("read", 101.0, 102.5, 10)
    tl.add("send", 103.0, 104.0, 20)
    assert tl.compact(since=99.0) == {"read": [[2.0, 3.5, 10, 1]], "send": [[4.0, 5.0, 20, 1]]}


def test_cut_covers_the_range_at_span_edges() -> None:
    spans = [(10, 20), (30, 40)]
    assert cut(spans, 0, 50) == [(0, 10, False), (10, 20, True), (20, 30, False), (30, 40, True),
                                 (40, 50, False)]
    assert cut(spans, 12, 3) == [(12, 15, True)]
    assert cut(spans, 20, 10) == [(20, 30, False)]
    assert cut([], 5, 5) == [(5, 10, False)]


def _ring_plan(nodes: int, tensors: int = 24, rows: int = 1024):
    index = make_index([(f"w{i}", (rows, 1024)) for i in range(tensors)], dtype="F32",
                       shard_bytes=16 * MB)
    cluster = make_cluster(nodes, 1, device="cpu", storage_gbps=10.0, storage_total_gbps=0.25,
                           inter_node_gbps=0.2387)
    options = PlanOptions(transport="node-shared", chunk_bytes=12 * MB)
    return plan_load(index, cluster, replicate_map(index, cluster), options), cluster


def test_pieces_follow_each_hop_in_due_order_on_every_pair() -> None:
    """A piece at hop s is due after the same piece at hop s - 1 (the deadlock-freedom of the
    dataflow), and each pair's pieces cover exactly the bytes of its hops."""
    plan, _ = _ring_plan(4)
    base = first_hop_bases(plan)
    keys: dict[tuple[int, int], dict[int, tuple]] = {}
    pair_bytes: dict[tuple[int, int], int] = {}
    for t in plan.transfers:
        pieces = pieces_of(plan, t.chunks)
        assert sum(p[3] for p in pieces) == sum(plan.chunks[c].length for c in t.chunks)
        assert all(0 < p[3] <= PIECE_BYTES for p in pieces)
        pair_bytes[(t.src, t.dsts[0])] = pair_bytes.get((t.src, t.dsts[0]), 0) + sum(p[3] for p in pieces)
        for p in pieces:
            keys.setdefault((p[0], p[2]), {})[t.step] = due(plan, base, t.step, p)
    assert any(len(steps) == 3 for steps in keys.values())  # 4 nodes: 3 hops per piece
    for steps in keys.values():
        ordered = [steps[s] for s in sorted(steps)]
        assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)
    assert len(pair_bytes) == 4 and len(set(pair_bytes.values())) <= 2


def test_mirror_spans_cover_tensors_split_between_nodes() -> None:
    plan, _ = _ring_plan(2, tensors=3, rows=6000)  # 2 chunks per tensor, 2 readers: one split
    for rank in (0, 1):
        spans = mirror_spans(plan, rank, {rank})
        split = {c.tensor for c in plan.chunks if c.reader == rank} & \
            {c.tensor for c in plan.chunks if c.reader != rank}
        want = sorted((c.offset, c.offset + c.length) for c in plan.chunks
                      if c.reader == rank and c.tensor in split)
        assert [s for v in spans.values() for s in v] == want
        assert want, "the plan splits no tensor between the nodes: the test proves nothing"


def test_cost_model_overlaps_ring_and_reads() -> None:
    """Storage-bound 4-node ring (62.5 MB/s per node, 0.24 GB/s links): the prediction is the
    read time plus a short drain, not their sum; 8 nodes likewise."""
    for nodes in (4, 8):
        plan, cluster = _ring_plan(nodes, tensors=256)
        p = predict(plan, cluster)
        serial = predict(plan, cluster, overlap=False)
        drain = 0.3 * p.phases["transfer"]  # the last pieces' hops and the link's backlog
        assert p.lower_bound_seconds <= p.total_seconds < p.phases["read"] + drain
        assert serial.total_seconds > p.phases["read"] + 0.8 * p.phases["transfer"]


# ---------------------------------------------------------------- real ranks

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    """~26 MB in 3 shards: chunks of 12 MiB, so pieces of 8 MiB cut chunks and tensors are
    split between readers."""
    d = tmp_path_factory.mktemp("ring")
    g = torch.Generator().manual_seed(3)
    tensors = {f"model.layers.{i}.w": torch.randn(1536, 1024, generator=g) for i in range(4)}
    tensors["model.embed.weight"] = torch.randn(700, 1000, generator=g).to(torch.bfloat16)
    tensors["model.norm.weight"] = torch.randn(1024, generator=g)
    write_sharded(d, tensors, shards=3)
    return str(d)


@pytest.mark.parametrize("strategy", ["replicate", "tp"])
def test_three_node_ring_bit_exact_with_timelines(big: str, strategy: str) -> None:
    """3 emulated nodes x 1 rank: pieces are forwarded (two hops), every tensor is bit-exact,
    each byte is read once, and each rank's report has its reads, sends and receives."""
    args = {"source": big, "device_map": strategy, "verify": True, "timeout": 60,
            "transport": "node-shared", "chunk_bytes": 12 * MB}
    results = spawn(3, "weightcast.launch.jobs:load_job", args, timeout=240, nodes=["a", "b", "c"])
    assert all(r.value["mismatches"] == [] for r in results)
    report = results[0].value["report"]
    assert report["total_read_bytes"] == report["checkpoint_bytes"]
    for entry in report["ranks"]:
        tl = entry["timeline"]
        assert sum(e[2] for e in tl["read"]) == entry["read_bytes"]
        assert sum(e[2] for e in tl["send"]) == entry["sent_bytes"] > 0
        assert sum(e[2] for e in tl["recv"]) == entry["recv_bytes"] > 0
        assert all(0 <= e[0] <= e[1] <= entry["seconds"] for k in tl for e in tl[k])
        if strategy == "replicate":  # a node receives all it did not read, half of it forwarded
            assert entry["recv_bytes"] + entry["read_bytes"] == report["checkpoint_bytes"]
            assert entry["sent_bytes"] > entry["read_bytes"]


# ---------------------------------------------------------------- benchmark side

def test_timeline_plot_and_sweep_table(tmp_path) -> None:
    """The per-rank plot reads a load report; the sweep table divides by the baseline of the same
    node count and rates, and by the prediction."""
    from benchmarks import timeline_plot
    from benchmarks.cluster_emu import sweep
    report = {"ranks": [{"rank": r, "phases": {"plan": [0, 0.1], "views": [3.0, 3.1]},
                         "timeline": {"read": [[0.1, 2.0, 100, 3]], "send": [[0.5, 2.9, 300, 9]],
                                      "recv": [[0.2, 3.0, 300, 9]]}} for r in range(2)]}
    entries = timeline_plot.rank_entries(report, None, None, 0)
    out = timeline_plot.plot(entries, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000 and out.endswith("t.png")
    assert timeline_plot.summary(entries)[0]["send"] == {"start": 0.5, "end": 2.9, "bytes": 300,
                                                          "gbps": round(300 / 2.4 / 1e9, 4)}
    common = {"nodes": 4, "ranks_per_node": 1, "link_gbit": 1.0, "storage_mbps": 125.0,
              "storage_x": 1.0, "cpu_busy_frac": 0.5, "loadavg_max": 1.5}
    rows = [{**common, "key": "hf", "loader": "from_pretrained", "wall_min_s": 32.0,
             "wall_median_s": 32.5, "model_s": 31.5},
            {**common, "key": "wc-replicate", "loader": "weightcast replicate", "wall_min_s": 8.0,
             "wall_median_s": 8.4, "model_s": 8.5}]
    text = sweep.table(rows)
    assert "| 4 | 1 Gbit/s, 125 MB/s | weightcast replicate | 8.00 / 8.40 | 4.00 | 8.50 | 0.94 |" in text
