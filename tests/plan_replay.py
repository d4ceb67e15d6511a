"""A pure-Python replay of a LoadPlan and the reference semantics it is checked against.

``check_plan`` asserts the planner's guarantees (coverage once per cluster or node, no unneeded
byte, every owner ends with exactly its bytes); ``check_ring`` the node-shared ring schedule.
"""
from __future__ import annotations

from weightcast.orchestrator.checkpoint import CheckpointIndex
from weightcast.orchestrator.cluster import ClusterSpec
from weightcast.orchestrator.device_map import ClusterDeviceMap, Place, Replicate, shard_bounds
from weightcast.orchestrator.planner import LoadPlan, owned_of, rank_read_bytes


# ---------------------------------------------------------------- reference semantics

def required(index: CheckpointIndex, dm: ClusterDeviceMap, world: int) -> dict[int, dict]:
    """rank -> tensor -> set of byte positions the rank must end up with (computed from the
    placements, independently of the planner). A dim > 0 shard needs the whole tensor's bytes
    (it is cut out after the tensor arrives), marked by 'scatter' in the value's second slot."""
    out: dict[int, dict[str, tuple[frozenset, bool]]] = {r: {} for r in range(world)}
    for t in index.tensors:
        p = dm.placements[t.name]
        whole = frozenset(range(t.length))
        if isinstance(p, Place):
            out[p.rank][t.name] = (whole, False)
        elif isinstance(p, Replicate) or not t.shape:
            ranks = p.ranks if isinstance(p, Replicate) else [r for g in p.groups for r in g]
            for r in ranks:
                out[r][t.name] = (whole, False)
        else:
            dim = p.dim % len(t.shape)
            for g in p.groups:
                for i, r in enumerate(g):
                    if dim:
                        out[r][t.name] = (whole, True)
                        continue
                    a, b = shard_bounds(t.shape[0], len(g), i)
                    row = t.length // t.shape[0] if t.shape[0] else 0
                    out[r][t.name] = (frozenset(range(a * row, b * row)), False)
    return out


def chunk_bytes(plan: LoadPlan, cid: int) -> tuple[str, frozenset]:
    c = plan.chunks[cid]
    return c.tensor, frozenset(range(c.tensor_offset, c.tensor_offset + c.length))


def replay(plan: LoadPlan, index: CheckpointIndex) -> dict:
    """Execute ``plan`` symbolically. Returns holder -> tensor -> byte positions, where a holder
    is a rank (collective) or a node name (node-shared); asserts that every transfer sends only
    what its source holds and that nothing is received twice. Scatter dsts get ('slice', t)."""
    node_of = {r: n for n, ranks in plan.nodes for r in ranks}
    shared = plan.options.transport == "node-shared"
    holder = (lambda r: node_of[r]) if shared else (lambda r: r)
    held: dict = {}
    slices: set = set()

    def give(h: object, cid: int, by: str) -> None:
        name, pos = chunk_bytes(plan, cid)
        have = held.setdefault(h, {}).setdefault(name, set())
        assert not (have & pos), f"{h} gets bytes of chunk {cid} twice ({by})"
        have |= pos

    def has(h: object, cid: int) -> bool:
        name, pos = chunk_bytes(plan, cid)
        return pos <= held.get(h, {}).get(name, set())

    entries = {t.name: t for t in index.tensors}
    for item in plan.reads:
        for cid in item.chunks:
            c = plan.chunks[cid]
            assert c.reader == item.rank and c.file == item.file
            assert item.offset <= c.offset and c.offset + c.length <= item.offset + item.length
            assert entries[c.tensor].offset + c.tensor_offset == c.offset
            give(holder(item.rank), cid, "read")
    for t in plan.transfers:
        assert all(has(holder(t.src), cid) for cid in t.chunks), f"{t} sends what src lacks"
        if t.kind == "scatter":
            for d in t.dsts:
                for name in {plan.chunks[c].tensor for c in t.chunks}:
                    assert (d, name) not in slices
                    slices.add((d, name))
            continue
        dsts = t.dsts if t.kind != "broadcast" else [r for r in range(plan.world_size) if r != t.src]
        if t.kind == "hop":
            assert len(t.dsts) == 1 and node_of[t.src] != node_of[t.dsts[0]]
        for d in dsts:
            for cid in t.chunks:
                give(holder(d), cid, t.kind)
    return {"held": held, "slices": slices}


def check_plan(plan: LoadPlan, index: CheckpointIndex, cluster: ClusterSpec,
               dm: ClusterDeviceMap) -> None:
    world = cluster.world_size
    need = required(index, dm, world)
    entries = {t.name: t for t in index.tensors}
    # owned entries agree with the placements
    for r in range(world):
        mine = owned_of(plan, r)
        assert [o.name for o in mine] == sorted(need[r])
        for o in mine:
            assert o.device == (dm.placements[o.name].device if isinstance(
                dm.placements[o.name], Place) else cluster.ranks[r].device)
    assert [o.rank for o in plan.owned] == sorted(o.rank for o in plan.owned)
    # chunks: ids are positions, (file, offset) order, reader is a consumer
    keys = [(c.file, c.offset) for c in plan.chunks]
    assert keys == sorted(keys) and [c.id for c in plan.chunks] == list(range(len(plan.chunks)))
    for c in plan.chunks:
        assert 0 < c.length <= plan.options.chunk_bytes
        assert c.reader in c.consumers and list(c.consumers) == sorted(set(c.consumers))
        if len(c.consumers) == 1:
            assert c.reader == c.consumers[0]
    _check_coverage(plan, cluster, need)
    _check_reads(plan)
    _check_outcome(plan, cluster, need, replay(plan, index), entries)


def _check_coverage(plan: LoadPlan, cluster: ClusterSpec, need: dict) -> None:
    """Every needed byte read exactly once per cluster (shared) or per node (node-local);
    no byte nobody needs is read."""
    scopes = [tuple(range(cluster.world_size))] if cluster.storage == "shared" else \
        [cluster.ranks_on(n) for n in cluster.nodes]
    for scope in scopes:
        wanted: dict[str, set] = {}
        for r in scope:
            for name, (pos, _) in need[r].items():
                wanted.setdefault(name, set()).update(pos)
        got: dict[str, set] = {}
        for c in plan.chunks:
            if c.reader in scope:
                name, pos = chunk_bytes(plan, c.id)
                assert not (got.get(name, set()) & pos), f"byte of {name} read twice"
                got.setdefault(name, set()).update(pos)
        assert got == {k: v for k, v in wanted.items() if v}
    union: dict[str, set] = {}
    for per_rank in need.values():
        for name, (pos, _) in per_rank.items():
            union.setdefault(name, set()).update(pos)
    assert plan.needed_bytes == sum(len(v) for v in union.values())


def _check_reads(plan: LoadPlan) -> None:
    keys = [(r.rank, r.file, r.offset) for r in plan.reads]
    assert keys == sorted(keys)
    covered = sorted(cid for r in plan.reads for cid in r.chunks)
    assert covered == list(range(len(plan.chunks)))
    for r in plan.reads:
        cs = [plan.chunks[i] for i in r.chunks]
        assert cs[0].offset == r.offset and cs[-1].offset + cs[-1].length == r.offset + r.length
        for a, b in zip(cs, cs[1:]):
            assert 0 <= b.offset - (a.offset + a.length) <= plan.options.gap_bytes
    gaps = sum(r.length for r in plan.reads) - sum(c.length for c in plan.chunks)
    assert gaps >= 0 and (plan.options.gap_bytes or gaps == 0)
    assert sum(rank_read_bytes(plan)) == sum(r.length for r in plan.reads)


def _check_outcome(plan: LoadPlan, cluster: ClusterSpec, need: dict, state: dict,
                   entries: dict) -> None:
    """Each rank (collective) or node (node-shared) ends with exactly the bytes it needs."""
    held, slices = state["held"], state["slices"]
    if plan.options.transport == "node-shared":
        for n in cluster.nodes:
            wanted: dict[str, set] = {}
            for r in cluster.ranks_on(n):
                for name, (pos, _) in need[r].items():
                    wanted.setdefault(name, set()).update(pos)
            assert {k: v for k, v in held.get(n, {}).items() if v} == \
                {k: v for k, v in wanted.items() if v}
        assert not slices
        return
    for r in range(cluster.world_size):
        mine = held.get(r, {})
        for name, (pos, scatter) in need[r].items():
            if scatter and (r, name) in slices:
                assert not mine.get(name)
                continue
            assert mine.get(name, set()) == set(pos), f"rank {r} tensor {name}"
        assert set(k for k, v in mine.items() if v) <= set(need[r])


# ---------------------------------------------------------------- ring schedule

def check_ring(plan: LoadPlan) -> None:
    """Node-shared: every chunk reaches every node that needs it and did not read it exactly
    once, along hops whose steps and rounds increase; no chunk goes to a node without need."""
    if plan.options.transport != "node-shared":
        return
    node_of = {r: n for n, ranks in plan.nodes for r in ranks}
    order = [n for n, _ in plan.nodes]
    arrivals: dict[int, list[tuple[int, int, str, str]]] = {}
    rounds = [t.round for t in plan.transfers]
    assert rounds == sorted(rounds)
    for t in plan.transfers:
        assert t.kind == "hop" and t.round >= t.step
        for cid in t.chunks:
            arrivals.setdefault(cid, []).append((t.step, t.round, node_of[t.src],
                                                 node_of[t.dsts[0]]))
    for c in plan.chunks:
        home = node_of[c.reader]
        wanted = {node_of[r] for r in c.consumers} - {home}
        if plan.storage == "node-local":
            wanted = set()
        hops = sorted(arrivals.get(c.id, []))
        assert sorted(h[3] for h in hops) == sorted(wanted)
        prev = home
        for s, (step, rnd, src, dst) in enumerate(hops):
            assert step == s and src == prev
            assert s == 0 or rnd > hops[s - 1][1]
            prev = dst
        ring = [order[(order.index(home) + i) % len(order)] for i in range(1, len(order))]
        assert [h[3] for h in hops] == [n for n in ring if n in wanted]
