"""Bandwidth model of a LoadPlan: predicted seconds per rank and in total, next to a lower bound.

Called by ``weightcast plan --simulate`` and the benchmarks; pure. The model follows how the
workers execute a plan:

- **read**: a node's ranks share the node's storage bandwidth (``storage_gbps``); on shared
  storage the nodes also share ``storage_total_gbps`` (water-filling: each node gets the fair
  share of the cap, at most its own bandwidth); inside a node ranks share fairly (processor
  sharing), so a rank with less to read finishes earlier.
- **transfer**: items run round by round (the point-to-point items of a round together, each
  broadcast alone: it blocks every rank); a round lasts as long as its busiest link. Links are a
  rank's intra-node link (``intra_node_gbps``, each direction), a node's network (``inter_node_gbps``,
  each direction) and, for bytes staged in a node's shared memory, the receiving rank's first
  touch (``first_touch_gbps``). On GPU clusters (NCCL) a ``broadcast`` crosses each node
  boundary once and each rank's intra link once (a pipelined tree/ring); on CPU clusters (gloo)
  it is one-to-all, like ``send``. ``send`` and ``scatter`` are point to point from the source
  (its links carry one copy, or one slice, per destination); a ``hop`` crosses one node boundary.
- **first touch**: memory a rank must hold privately is written once at ``first_touch_gbps``:
  everything a CPU rank owns with the collective transport, only dim > 0 slices with node-shared
  staging (the rest are views of the page cache and the staging area); nothing for GPU ranks.
- Reading overlaps moving: a collective bucket moves as soon as it is read; the node-shared ring
  is a dataflow whose pieces move as soon as they are read or received, its readers reading
  their ring buckets first (:mod:`weightcast.orchestrator.cost_ring`). ``overlap=False`` models
  reading everything first, then the transfer round by round.
- **node-shared**: the whole group meets at a barrier after the transfer; views follow (no
  copy: tensors read partly here and partly elsewhere are put whole in the staging area while
  being read), then private first touches and unmapping the staging areas.
- **fixed** costs per load: the planning exchange and phase syncs; ``phases["first_access"]``
  is what mapping the views' pages costs their first reader (outside the load itself).

The lower bound is ``max(bytes read per node / storage bw, bytes read / aggregate cap,
busiest link's bytes / its bw, largest private first touch)``: no schedule of the same plan
beats it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from weightcast.orchestrator.cluster import GB, ClusterSpec
from weightcast.orchestrator.cost_ring import ring_ends
from weightcast.orchestrator.planner import (LoadPlan, TransferItem, owned_bytes, owned_table, slice_bytes,
                                  tensor_lengths)

# Measured on the development VM (2 cores) and its emulated cluster, 2026-12-05:
FIXED_SECONDS = 0.03   # planning exchange and phase syncs of one load (4 ranks)
RELEASE_GBPS = 5.0     # unmapping a rank's staging areas after its views are made
VIEW_MAP_GBPS = 4.0    # first access to the pages of node-shared views (page-table setup)

Link = tuple[str, object]  # ("rank-out" | "rank-in" | "node-out" | "node-in" | "touch", rank/node)


@dataclass(frozen=True, slots=True)
class Prediction:
    per_rank_seconds: tuple[float, ...]
    total_seconds: float
    lower_bound_seconds: float
    phases: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    bound_by: str = ""  # which term of the lower bound binds


def predict(plan: LoadPlan, cluster: ClusterSpec, *, overlap: bool | None = None) -> Prediction:
    """Predict the wall time of executing ``plan`` on ``cluster`` (see the module docstring)."""
    node_of = {r: n for n, ranks in plan.nodes for r in ranks}
    read_s = read_seconds(plan, cluster, node_of)
    tree = any(d.startswith("cuda") for d in plan.devices or cluster.devices)
    rounds, links = transfer_links(plan, node_of, tree)
    bw = _link_bandwidths(cluster)
    transfer_s = sum(max(b / bw[k[0]] for k, b in load.items()) for load in rounds if load)
    touch = private_bytes(plan, cluster)
    touch_s = [b / (cluster.first_touch_gbps * GB) for b in touch]
    read_end = max(read_s, default=0.0)
    if overlap is None:
        overlap = True
    moved = _moved_end(plan, cluster, read_s, node_of, rounds, bw, transfer_s, overlap)
    after = fixed_seconds(plan, node_of)
    per_rank = tuple(max(read_s[r], moved[r]) + touch_s[r] + after[r] for r in range(plan.world_size))
    if plan.options.transport == "node-shared":  # barriers of the whole group: views together
        ready = max((p - t - a for p, t, a in zip(per_rank, touch_s, after)), default=0.0)
        per_rank = tuple(ready + t + a for t, a in zip(touch_s, after))
    lower, bound_by = lower_bound(plan, cluster, links, touch_s, node_of)
    phases = {"read": read_end, "transfer": transfer_s, "first_touch": max(touch_s, default=0.0),
              "fixed": max(after, default=0.0), "first_access": first_access_seconds(plan)}
    return Prediction(per_rank, max(per_rank, default=0.0), lower, MappingProxyType(phases),
                      bound_by)


def fixed_seconds(plan: LoadPlan, node_of: dict[int, str]) -> list[float]:
    """Per rank: the costs of a load besides moving bytes: the planning exchange and phase
    syncs (:data:`FIXED_SECONDS`) and, with node-shared staging, unmapping the areas a rank
    received into once the views are made (:data:`RELEASE_GBPS`)."""
    out = [FIXED_SECONDS] * plan.world_size
    if plan.options.transport == "node-shared":
        sizes = [c.length for c in plan.chunks]
        for t in plan.transfers:
            if t.kind == "hop":
                for d in t.dsts:
                    out[d] += sum(sizes[c] for c in t.chunks) / (RELEASE_GBPS * GB)
    return out


def first_access_seconds(plan: LoadPlan) -> float:
    """Seconds the busiest rank spends mapping the pages of its views on their first access
    (node-shared CPU ranks get views, not copies; not part of the load, but of a benchmark that
    touches every page): :data:`VIEW_MAP_GBPS`."""
    if plan.options.transport != "node-shared":
        return 0.0
    lengths = tensor_lengths(plan)
    per_rank = [0] * plan.world_size
    for row in owned_table(plan).rows:
        n = owned_bytes(row, lengths.get(row.name, 0))
        for r in row.ranks:
            per_rank[r] += n
    return max(per_rank, default=0) / (VIEW_MAP_GBPS * GB)


def _moved_end(plan: LoadPlan, cluster: ClusterSpec, read_s: list[float], node_of: dict[int, str],
               rounds: list[dict[Link, float]], bw: dict[str, float], transfer_s: float,
               overlap: bool) -> list[float]:
    """Per rank: when the bytes it moves have moved. The node-shared ring overlapped with the
    reads is a dataflow (:mod:`weightcast.orchestrator.cost_ring`); collective buckets move
    round by round, the first once read (``fill``), the last after the reads end."""
    if not transfer_s:
        return [0.0] * plan.world_size
    read_end = max(read_s, default=0.0)
    if overlap and any(t.kind == "hop" for t in plan.transfers):
        return ring_ends(plan, cluster, read_s, node_of)
    if overlap:
        fill = read_end / max(1, len(rounds))
        last = max(b / bw[k[0]] for k, b in rounds[-1].items()) if rounds[-1] else 0.0
        moved_end = max(read_end + last, transfer_s + fill)
    else:
        moved_end = read_end + transfer_s
    busy = {r for t in plan.transfers for r in (t.src, *t.dsts)}
    if any(t.kind == "broadcast" for t in plan.transfers):
        busy = set(range(plan.world_size))
    return [moved_end if r in busy else 0.0 for r in range(plan.world_size)]


# ---------------------------------------------------------------- reading

def read_seconds(plan: LoadPlan, cluster: ClusterSpec, node_of: dict[int, str]) -> list[float]:
    """Seconds each rank spends reading (its finish time in the read phase)."""
    per_rank = [0] * plan.world_size
    for item in plan.reads:
        per_rank[item.rank] += item.length
    node_bytes: dict[str, int] = defaultdict(int)
    for r, n in enumerate(per_rank):
        node_bytes[node_of[r]] += n
    cap = cluster.storage_total_gbps if plan.storage == "shared" else None
    node_end = water_fill(dict(node_bytes), cluster.storage_gbps * GB,
                          cap * GB if cap else None)
    out = [0.0] * plan.world_size
    for node, ranks in plan.nodes:
        if node_bytes[node]:
            rate = node_bytes[node] / node_end[node]
            for r, t in zip(ranks, _shared_finish([per_rank[r] for r in ranks], rate)):
                out[r] = t
    return out


def water_fill(sizes: dict[str, int], each: float, total: float | None) -> dict[str, float]:
    """Finish time of flows of ``sizes`` bytes, each at most ``each`` B/s, all together at most
    ``total`` B/s (fair share of it), re-shared whenever a flow ends."""
    left = {k: float(v) for k, v in sizes.items() if v > 0}
    out = {k: 0.0 for k in sizes}
    now = 0.0
    while left:
        rate = each if total is None else min(each, total / len(left))
        step = min(left.values()) / rate
        now += step
        for k in list(left):
            left[k] -= rate * step
            if left[k] <= 1e-6 * sizes[k]:
                out[k] = now
                del left[k]
    return out


def _shared_finish(sizes: list[int], rate: float) -> list[float]:
    """Processor sharing of ``rate`` among flows of ``sizes``: each one's finish time."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    out = [0.0] * len(sizes)
    now, done, active = 0.0, 0, sum(1 for s in sizes if s > 0)
    for i in order:
        if sizes[i] <= 0:
            continue
        now += (sizes[i] - done) * active / rate
        done = sizes[i]
        active -= 1
        out[i] = now
    return out


# ---------------------------------------------------------------- moving

def _link_bandwidths(cluster: ClusterSpec) -> dict[str, float]:
    return {"rank-out": cluster.intra_node_gbps * GB, "rank-in": cluster.intra_node_gbps * GB,
            "node-out": cluster.inter_node_gbps * GB, "node-in": cluster.inter_node_gbps * GB,
            "touch": cluster.first_touch_gbps * GB}


def transfer_links(plan: LoadPlan, node_of: dict[int, str], tree: bool = True
                   ) -> tuple[list[dict[Link, float]], dict[Link, float]]:
    """(bytes per link in each round, in execution order; bytes per link over the load).
    ``tree``: broadcasts are pipelined trees/rings (NCCL); else one-to-all (gloo). A broadcast's
    receiving side (the same bytes on every rank) is kept as one ``("rank-in", "*")`` /
    ``("node-in", "*")`` entry per round and spread over the ranks only in the totals."""
    sizes = [c.length for c in plan.chunks]
    slices = slice_bytes(plan) if any(t.kind == "scatter" for t in plan.transfers) else {}
    local = defaultdict(int)
    for r in range(plan.world_size):
        local[node_of[r]] += 1
    rounds: list[dict[Link, float]] = []
    total: dict[Link, float] = defaultdict(float)
    everyone = _Everyone(plan, node_of, local, tree)
    current = None
    for t in plan.transfers:
        if current is None or t.round != current or t.kind == "broadcast":
            rounds.append(defaultdict(float))
            current = t.round if t.kind != "broadcast" else None  # broadcasts block: alone
        n = sum(sizes[c] for c in t.chunks)
        if t.kind == "broadcast":
            links = everyone.add(t.src, n)
        else:
            links = _item_links(t, n, plan, node_of, slices)
        for link, b in links:
            rounds[-1][link] += b
            if link[1] != "*":
                total[link] += b
    everyone.spread(total)
    return rounds, total


class _Everyone:
    """Broadcast accounting without a per-rank loop per item: totals per source, spread at the
    end (every rank but the source receives each broadcast)."""

    def __init__(self, plan: LoadPlan, node_of: dict[int, str], local: dict[str, int],
                 tree: bool) -> None:
        self.world, self.node_of, self.local, self.tree = plan.world_size, node_of, local, tree
        self.nodes = [n for n, _ in plan.nodes]
        self.all = 0.0
        self.by_src: dict[int, float] = defaultdict(float)
        self.by_node: dict[str, float] = defaultdict(float)

    def add(self, src: int, n: int) -> list[tuple[Link, float]]:
        self.all += n
        self.by_src[src] += n
        node = self.node_of[src]
        self.by_node[node] += n
        peers = self.local[node] - 1
        remote = self.world - self.local[node]
        if self.tree:
            out: list[tuple[Link, float]] = [(("rank-out", src), n), (("rank-in", "*"), n)]
            if remote:
                out += [(("node-out", node), n), (("node-in", "*"), n)]
            return out
        out = [(("rank-out", src), n * peers), (("rank-in", "*"), n)]
        if remote:
            busiest = max(self.local[m] for m in self.nodes if m != node)
            out += [(("node-out", node), n * remote), (("node-in", "*"), n * busiest)]
        return out

    def spread(self, total: dict[Link, float]) -> None:
        if not self.all:
            return
        for r in range(self.world):
            total[("rank-in", r)] += self.all - self.by_src[r]
        for m in self.nodes:
            got = self.all - self.by_node[m]
            if got:
                total[("node-in", m)] += got * (1 if self.tree else self.local[m])


def _item_links(t: TransferItem, n: int, plan: LoadPlan, node_of: dict[int, str],
                slices: dict[tuple[str, int], int]) -> list[tuple[Link, float]]:
    src_node = node_of[t.src]
    if t.kind == "hop":
        d = t.dsts[0]
        return [(("node-out", src_node), n), (("node-in", node_of[d]), n), (("touch", d), n)]
    names = {plan.chunks[c].tensor for c in t.chunks} if t.kind == "scatter" else ()
    out: list[tuple[Link, float]] = []
    for d in t.dsts:
        b = n if t.kind != "scatter" else sum(slices.get((name, d), 0) for name in names)
        if node_of[d] == src_node:
            out += [(("rank-out", t.src), b), (("rank-in", d), b)]
        else:
            out += [(("node-out", src_node), b), (("node-in", node_of[d]), b)]
    return out


# ---------------------------------------------------------------- memory and bound

def private_bytes(plan: LoadPlan, cluster: ClusterSpec) -> list[int]:
    """Bytes each rank writes into fresh private host memory (see the module docstring)."""
    lengths = tensor_lengths(plan)
    out = [0] * plan.world_size
    shared = plan.options.transport == "node-shared"
    for row in owned_table(plan).rows:
        if shared and not (row.dim and row.shape):
            continue
        n = owned_bytes(row, lengths.get(row.name, 0))
        for r in row.ranks:
            device = row.device or cluster.ranks[r].device
            if device == "cpu":
                out[r] += n
    return out


def lower_bound(plan: LoadPlan, cluster: ClusterSpec, links: dict[Link, float],
                touch_s: list[float], node_of: dict[int, str]) -> tuple[float, str]:
    node_bytes: dict[str, int] = defaultdict(int)
    for item in plan.reads:
        node_bytes[node_of[item.rank]] += item.length
    terms = {"storage per node": max(node_bytes.values(), default=0) / (cluster.storage_gbps * GB),
             "first touch": max(touch_s, default=0.0)}
    if plan.storage == "shared" and cluster.storage_total_gbps:
        terms["storage aggregate"] = sum(node_bytes.values()) / (cluster.storage_total_gbps * GB)
    bw = _link_bandwidths(cluster)
    for (kind, _), b in links.items():
        name = "inter-node link" if kind.startswith("node") else \
            "intra-node link" if kind.startswith("rank") else "staging first touch"
        terms[name] = max(terms.get(name, 0.0), b / bw[kind])
    name = max(terms, key=lambda k: (terms[k], k))
    return terms[name], name
