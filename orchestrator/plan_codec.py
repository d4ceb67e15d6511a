"""LoadPlan <-> compact JSON bytes (the blob rank 0 broadcasts; see DESIGN step 5).

Called through :func:`weightcast.orchestrator.planner.plan_to_json` / ``plan_from_json``. Deterministic:
sorted keys, no whitespace, only ints and strings, so equal plans give equal bytes. Compact:
tensor names, rank sets (as runs ``[start, stop, start, stop, ...]``) and files are tables that
rows, chunks, reads and transfers refer to by index; columns instead of objects.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from weightcast.orchestrator.errors import PlanError
from weightcast.orchestrator.plan_types import (Chunk, FileStamp, LoadPlan, OwnedRow, OwnedTable, PlanOptions,
                                  ReadItem, TransferItem, owned_table)

FORMAT = "weightcast-plan"
VERSION = 1
KINDS = ("broadcast", "send", "scatter", "hop")

if TYPE_CHECKING:
    from weightcast.orchestrator.order import LoadOrder


def _runs(ranks: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for r in ranks:
        if out and out[-1] == r:
            out[-1] = r + 1
        else:
            out += [r, r + 1]
    return out


def _unruns(runs: list[int]) -> tuple[int, ...]:
    return tuple(r for i in range(0, len(runs), 2) for r in range(runs[i], runs[i + 1]))


class _Table:
    """Values -> dense indices, in first-seen order."""

    def __init__(self) -> None:
        self.index: dict = {}

    def __call__(self, value) -> int:  # type: ignore[no-untyped-def]
        got = self.index.get(value)
        if got is None:
            got = self.index[value] = len(self.index)
        return got


def encode(plan: LoadPlan) -> bytes:
    """The plan's compact JSON bytes."""
    return _dumps(plan_doc(plan))


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def plan_doc(plan: LoadPlan) -> dict:
    """The plan as a JSON-able dict (what :func:`encode` writes)."""
    table = owned_table(plan)
    sets, tensors, files = _Table(), _Table(), _Table()
    for f in plan.files:
        files(f.name)
    tensor_meta: dict[str, list] = {}
    owned = []
    for row in table.rows:
        tensor_meta.setdefault(row.name, [row.dtype, list(row.shape)])
        owned.append([tensors(row.name), row.dim, row.start, row.stop, row.device, sets(row.ranks)])
    cs = plan.chunks
    chunks = {"tensor": [tensors(c.tensor) for c in cs], "file": [files(c.file) for c in cs],
              "offset": [c.offset for c in cs], "length": [c.length for c in cs],
              "tensor_offset": [c.tensor_offset for c in cs], "reader": [c.reader for c in cs],
              "consumers": [sets(c.consumers) for c in cs]}
    rs = plan.reads
    reads = {"rank": [r.rank for r in rs], "file": [files(r.file) for r in rs],
             "offset": [r.offset for r in rs], "length": [r.length for r in rs],
             "chunks": [list(r.chunks) for r in rs]}
    transfers = _encode_transfers(plan.transfers, sets)
    o = plan.options
    doc = {
        "format": FORMAT, "version": VERSION, "world_size": plan.world_size,
        "nodes": [[n, list(r)] for n, r in plan.nodes], "storage": plan.storage,
        "options": {"transport": o.transport, "chunk_bytes": o.chunk_bytes,
                    "bucket_bytes": o.bucket_bytes, "gap_bytes": o.gap_bytes},
        "files": [[f.name, f.size, f.mtime_ns] + ([f.etag] if f.etag else []) for f in plan.files],
        "file_names": list(files.index), "devices": list(table.devices),
        "rank_sets": [_runs(s) for s in sets.index],
        "tensors": [[name] + tensor_meta.get(name, [None, None]) for name in tensors.index],
        "owned": owned, "chunks": chunks, "reads": reads, "transfers": transfers,
        "checkpoint_bytes": plan.checkpoint_bytes, "needed_bytes": plan.needed_bytes,
    }
    return doc


def decode(data: bytes) -> LoadPlan:
    """Inverse of :func:`encode`."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanError("the plan blob is not JSON", got=str(exc)[:200]) from None
    return plan_from_doc(doc)


def plan_from_doc(doc: Any) -> LoadPlan:
    """Inverse of :func:`plan_doc`; a malformed document is a PlanError."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise PlanError("not a weightcast plan of this version",
                        expected=f"{FORMAT} version {VERSION}",
                        got=(doc.get("format"), doc.get("version")) if isinstance(doc, dict)
                        else type(doc).__name__,
                        fix="use the same weightcast version on every rank")
    try:
        return _decode(doc)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise PlanError("the plan blob is inconsistent", got=f"{type(exc).__name__}: {exc}",
                        fix="use the same weightcast version on every rank") from None


def _decode(doc: dict) -> LoadPlan:
    sets = [_unruns(r) for r in doc["rank_sets"]]
    names = doc["file_names"]
    tensors = doc["tensors"]
    rows = [OwnedRow(tensors[t][0], tensors[t][1], tuple(tensors[t][2]), dim, start, stop, dev,
                     sets[s]) for t, dim, start, stop, dev, s in doc["owned"]]
    c = doc["chunks"]
    chunks = tuple(Chunk(i, tensors[t][0], names[f], off, n, toff, rd, sets[s])
                   for i, (t, f, off, n, toff, rd, s) in enumerate(zip(
                       c["tensor"], c["file"], c["offset"], c["length"], c["tensor_offset"],
                       c["reader"], c["consumers"], strict=True)))
    r = doc["reads"]
    reads = tuple(ReadItem(rank, names[f], off, n, tuple(ids)) for rank, f, off, n, ids in zip(
        r["rank"], r["file"], r["offset"], r["length"], r["chunks"], strict=True))
    transfers = _decode_transfers(doc["transfers"], sets)
    devices = tuple(doc["devices"])
    return LoadPlan(
        world_size=doc["world_size"], nodes=tuple((n, tuple(rk)) for n, rk in doc["nodes"]),
        storage=doc["storage"], options=PlanOptions(**doc["options"]),
        files=tuple(FileStamp(*f) for f in doc["files"]), owned=OwnedTable(rows, devices),
        chunks=chunks, reads=reads, transfers=transfers,
        checkpoint_bytes=doc["checkpoint_bytes"], needed_bytes=doc["needed_bytes"],
        devices=devices)


# ---------------------------------------------------------------- transfers

def _encode_transfers(ts: tuple[TransferItem, ...], sets: _Table) -> dict:
    """Items grouped by bucket (the chunk list written once per bucket); a ring bucket's hops
    are one chain ``[round, step, [src, dst, dst, ...]]``. Falls back to one column per field
    when the plan's order is not the canonical (round, bucket, step) one."""
    groups: dict[int, list[TransferItem]] = {}
    for t in ts:
        groups.setdefault(t.bucket, []).append(t)
    keys = [(t.round, t.bucket, t.step) for t in ts]
    if any(a > b for a, b in zip(keys, keys[1:])) \
            or any(len({(t.kind, t.chunks) for t in g}) != 1 for g in groups.values()):
        return {"kind": [KINDS.index(t.kind) for t in ts], "src": [t.src for t in ts],
                "dsts": [sets(t.dsts) for t in ts], "chunks": [list(t.chunks) for t in ts],
                "bucket": [t.bucket for t in ts], "step": [t.step for t in ts],
                "round": [t.round for t in ts]}
    out = []
    for b, g in groups.items():
        head = [KINDS.index(g[0].kind), b, list(g[0].chunks)]
        if _is_chain(g):
            out.append(head + [[g[0].round, g[0].step, [g[0].src] + [t.dsts[0] for t in g]]])
        else:
            out.append(head + [[[t.src, sets(t.dsts), t.step, t.round] for t in g]])
    return {"groups": out}


def _is_chain(g: list[TransferItem]) -> bool:
    """Hops whose steps and rounds rise by one and where each hop leaves from the last one's
    destination (a plain loop: this runs once per ring item of a large plan)."""
    step, rnd, at = g[0].step, g[0].round, g[0].src
    for t in g:
        if t.kind != "hop" or len(t.dsts) != 1 or t.step != step or t.round != rnd or t.src != at:
            return False
        step, rnd, at = step + 1, rnd + 1, t.dsts[0]
    return True


def _decode_transfers(doc: dict, sets: list[tuple[int, ...]]) -> tuple[TransferItem, ...]:
    if "groups" not in doc:
        return tuple(TransferItem(KINDS[k], src, sets[d], tuple(ids), b, s, rnd)
                     for k, src, d, ids, b, s, rnd in zip(
                         doc["kind"], doc["src"], doc["dsts"], doc["chunks"], doc["bucket"],
                         doc["step"], doc["round"], strict=True))
    items = []
    for kind, b, ids, spec in doc["groups"]:
        kind, ids = KINDS[kind], tuple(ids)
        if spec and isinstance(spec[0], int):  # a chain of hops
            rnd, step, ranks = spec
            items += [TransferItem(kind, ranks[i], (ranks[i + 1],), ids, b, step + i, rnd + i)
                      for i in range(len(ranks) - 1)]
        else:
            items += [TransferItem(kind, src, sets[d], ids, b, s, r) for src, d, s, r in spec]
    items.sort(key=lambda t: (t.round, t.bucket, t.step))
    return tuple(items)


# ---------------------------------------------------------------- the load order

ORDER_FORMAT = "weightcast-order"
_ORDER_FIELDS = ("kind", "root", "config", "transport", "load_id", "checkpoint_bytes", "files", "init_seed",
                 "auto_dtype", "model_tp_size", "crc32", "disk", "targets", "file_ids")


def encode_order(order: "LoadOrder") -> bytes:
    """The bytes rank 0 broadcasts: the order's fields, its plan and device map in one JSON
    document (encoded once; nothing nested is a string of JSON)."""
    from weightcast.orchestrator.device_map import device_map_to_json
    doc: dict[str, Any] = {"format": ORDER_FORMAT, "version": VERSION}
    doc.update({name: getattr(order, name) for name in _ORDER_FIELDS})
    doc["plan"] = plan_doc(order.plan) if order.plan is not None else None
    doc["device_map"] = json.loads(device_map_to_json(order.device_map)) if order.device_map is not None else None
    return _dumps(doc)


def decode_order(data: bytes) -> "LoadOrder":
    """Inverse of :func:`encode_order` (every rank, on the broadcast blob)."""
    from weightcast.orchestrator.device_map import device_map_from_json
    from weightcast.orchestrator.order import LoadOrder
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanError("the load order blob is not JSON", got=str(exc)[:200]) from None
    if not isinstance(doc, dict) or doc.get("format") != ORDER_FORMAT or doc.get("version") != VERSION:
        raise PlanError("not a weightcast load order of this version", expected=f"{ORDER_FORMAT} version {VERSION}",
                        fix="use the same weightcast version on every rank")
    fields = {name: doc.get(name) for name in _ORDER_FIELDS}
    fields["files"] = tuple(fields["files"] or ())
    for name in ("crc32", "disk", "file_ids"):
        fields[name] = {k: tuple(v) for k, v in fields[name].items()} if fields[name] else None
    plan = plan_from_doc(doc["plan"]) if doc.get("plan") is not None else None
    dm = device_map_from_json(json.dumps(doc["device_map"])) if doc.get("device_map") is not None else None
    return LoadOrder(plan=plan, device_map=dm, **fields)
