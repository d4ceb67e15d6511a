"""The ``collective`` transport: every rank ends with a private copy of exactly what it owns.

Each rank allocates its owned tensors once (on its device), reads its ReadItems straight into
them (through a pinned bounce buffer for CUDA), and then executes the plan's transfers in
order: ``broadcast`` over the load's data group, ``send`` and ``scatter`` point to point.
Reads run ahead in a thread pool, so bucket k+1 is read while bucket k is on the wire.

:func:`run_collective` is collective: every rank of the group calls it with the same plan.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable

import torch
import torch.distributed as dist

from weightcast.orchestrator.planner import Chunk, LoadPlan, ReadItem
from weightcast.workers.group import Group
from weightcast.workers.layout import (OwnedLayout, byte_view, chunk_region, local_shape, owned_by, owners_of,
                            torch_dtype, view_bytes_as)
from weightcast.workers.reader import ReadPool, StorageReader
from weightcast.workers.timeline import Timeline

SCRATCH_BYTES = 16 << 20


@dataclass
class TransferStats:
    read_bytes: int = 0
    recv_bytes: int = 0
    sent_bytes: int = 0
    cross_node_sent: int = 0
    cross_node_recv: int = 0
    staged_bytes: int = 0
    events: list = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)  # reads, sends, receives of the load
    unleased: dict = field(default_factory=dict)  # node-shared: file -> why it holds no read lease


class _Buffers:
    """This rank's owned tensors (as flat bytes) and the whole-tensor buffers of dim>0 shards."""

    def __init__(self, plan: LoadPlan, rank: int, device: torch.device) -> None:
        self.layouts: dict[str, OwnedLayout] = owned_by(plan, rank)
        self.device = device
        self.bytes: dict[str, torch.Tensor] = {}
        self.whole: dict[str, torch.Tensor] = {}
        self.last_chunk = {c.tensor: c.id for c in plan.chunks}  # chunks are in tensor order
        for name, lay in self.layouts.items():
            if lay.contiguous:
                self.bytes[name] = torch.empty(lay.length, dtype=torch.uint8, device=device)
            else:
                self.bytes[name] = byte_view(torch.empty(local_shape(lay.owned),
                                                         dtype=torch_dtype(lay.owned.dtype), device=device))

    def target(self, chunk: Chunk) -> torch.Tensor | None:
        """Where this rank keeps ``chunk``'s bytes (None: it does not keep them)."""
        lay = self.layouts.get(chunk.tensor)
        if lay is None:
            return None
        if not lay.contiguous:
            whole = self.whole.get(chunk.tensor)
            if whole is None:
                whole = self.whole[chunk.tensor] = torch.empty(lay.length, dtype=torch.uint8, device=self.device)
            return whole[chunk.tensor_offset:chunk.tensor_offset + chunk.length]
        region = chunk_region(lay, chunk)
        if region is None:
            return None
        off, n = region
        return self.bytes[chunk.tensor][off:off + n]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, lay in self.layouts.items():
            shape = local_shape(lay.owned)
            if lay.contiguous:
                out[name] = view_bytes_as(self.bytes[name], lay.owned.dtype, shape)
            else:
                out[name] = self.bytes[name].view(torch_dtype(lay.owned.dtype)).view(shape)
        return out

    def cut_slices(self) -> None:
        """Copy each dim>0 shard's slice out of its whole tensor (the reader's own slice)."""
        for name, whole in self.whole.items():
            lay = self.layouts[name]
            full = whole.view(torch_dtype(lay.owned.dtype)).view(lay.owned.shape)
            part = full.narrow(lay.owned.dim, lay.owned.start, lay.owned.stop - lay.owned.start)
            self.bytes[name].view(part.dtype).view(part.shape).copy_(part)
        self.whole.clear()


class _Bounce:
    """A few reusable host buffers (pinned for CUDA targets), one per read thread: reads of
    small runs of chunks, and every read bound for a GPU, pass through them, so read-ahead never
    holds more than ``threads x SCRATCH_BYTES`` of extra memory."""

    def __init__(self, count: int, pinned: bool) -> None:
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self.free.put(torch.empty(SCRATCH_BYTES, dtype=torch.uint8, pin_memory=pinned))

    def read(self, reader: StorageReader, file: str, offset: int, length: int,
             spill: Callable[[torch.Tensor, int], None]) -> None:
        """Read [offset, offset + length) piece by piece; ``spill(piece, piece_offset)`` copies
        each piece out before the buffer is reused."""
        buf = self.free.get()
        try:
            done = 0
            while done < length:
                n = min(SCRATCH_BYTES, length - done)
                reader.read_into(file, offset + done, memoryview(buf.numpy())[:n])
                spill(buf[:n], offset + done)
                done += n
        finally:
            self.free.put(buf)


def _submit_read(pool: ReadPool, bounce: _Bounce, item: ReadItem, chunks: tuple[Chunk, ...],
                 bufs: _Buffers, futures: dict[int, object]) -> None:
    """Queue the reads of one ReadItem: on CPU, big chunks straight into their targets; runs of
    small chunks (and everything bound for a GPU) through the bounce buffers."""
    direct = bufs.device.type == "cpu"
    run: list[Chunk] = []

    def spill_run(group: list[Chunk]) -> Callable[[torch.Tensor, int], None]:
        def spill(piece: torch.Tensor, at: int) -> None:
            for c in group:
                lo, hi = max(at, c.offset), min(at + piece.numel(), c.offset + c.length)
                dest = bufs.target(c) if hi > lo else None
                if dest is not None:
                    dest[lo - c.offset:hi - c.offset].copy_(piece[lo - at:hi - at])
        return spill

    def flush() -> None:
        if run:
            group = list(run)
            start, end = group[0].offset, group[-1].offset + group[-1].length
            fut = pool.run(lambda: bounce.read(pool.reader, item.file, start, end - start, spill_run(group)))
            for c in group:
                futures[c.id] = fut
            run.clear()

    for c in chunks:
        dest = bufs.target(c)
        if dest is not None and direct and c.length >= SCRATCH_BYTES:
            flush()
            futures[c.id] = pool.submit(c.file, c.offset, memoryview(dest.numpy()))
            continue
        if run and (c.offset + c.length - run[0].offset > SCRATCH_BYTES or c.offset != run[-1].offset + run[-1].length):
            flush()
        run.append(c)
    flush()


def run_collective(group: Group, plan: LoadPlan, reader: StorageReader, device: torch.device,
                   threads: int = 4) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Execute ``plan`` with private copies (collective over ``group``)."""
    stats = TransferStats()
    bufs = _Buffers(plan, group.rank, device)
    pool = ReadPool(reader, threads)
    bounce = _Bounce(max(1, threads), pinned=device.type == "cuda")
    futures: dict[int, object] = {}
    t0 = time.perf_counter()
    reads_done = [t0]

    def finished(_fut) -> None:
        reads_done[0] = max(reads_done[0], time.perf_counter())
    try:
        for item in plan.reads:
            if item.rank == group.rank:
                _submit_read(pool, bounce, item, tuple(plan.chunks[i] for i in item.chunks), bufs, futures)
        for fut in set(futures.values()):
            fut.add_done_callback(finished)
        for _, items in groupby(plan.transfers, key=lambda t: t.round):  # a round runs together
            _run_bucket(group, plan, list(items), bufs, futures, stats)
        for fut in futures.values():
            fut.result()
    finally:
        pool.close()
    stats.events += [("read", t0, reads_done[0]), ("transfer", t0, time.perf_counter())]
    bufs.cut_slices()
    stats.read_bytes = reader.bytes_read
    return bufs.tensors(), stats


def _run_bucket(group: Group, plan: LoadPlan, items: list, bufs: _Buffers,
                futures: dict[int, object], stats: TransferStats) -> None:
    me = group.rank
    pending = []
    for t in items:
        if t.src != me and me not in t.dsts:
            continue
        for cid in t.chunks:
            chunk = plan.chunks[cid]
            if t.src == me and cid in futures:
                futures[cid].result()
            if t.kind == "broadcast":
                region = bufs.target(chunk)
                dist.broadcast(region, t.src, group=group.data_pg)
                if t.src != me:
                    stats.recv_bytes += region.numel()
                else:
                    stats.sent_bytes += region.numel() * len(t.dsts)
            elif t.kind == "scatter":
                pending += _scatter(group, plan, t, chunk, bufs, stats)
            else:
                pending += _send(group, t, chunk, bufs, stats)
    for work in pending:
        work.wait()


class _Pending:
    """A point-to-point request and the temporary tensor it sends (kept alive until done)."""

    def __init__(self, work, keep: torch.Tensor) -> None:
        self.work, self.keep = work, keep

    def wait(self) -> None:
        self.work.wait()


def _send(group: Group, t, chunk: Chunk, bufs: _Buffers, stats: TransferStats) -> list:
    region = bufs.target(chunk)
    if t.src == group.rank:
        stats.sent_bytes += chunk.length * len(t.dsts)
        return [dist.isend(region, t_dst, group=group.data_pg) for t_dst in t.dsts]
    stats.recv_bytes += region.numel()
    return [dist.irecv(region, t.src, group=group.data_pg)]


def _scatter(group: Group, plan: LoadPlan, t, chunk: Chunk, bufs: _Buffers, stats: TransferStats) -> list:
    """The source holds the whole tensor (its chunks arrive one by one); once its last chunk is
    in, every destination gets its slice along the shard dim."""
    if chunk.id != bufs.last_chunk.get(chunk.tensor):
        return []
    me = group.rank
    if t.src != me:
        dest = bufs.bytes[chunk.tensor]
        stats.recv_bytes += dest.numel()
        return [dist.irecv(dest, t.src, group=group.data_pg)]
    whole = bufs.whole[chunk.tensor]
    works = []
    for o in owners_of(plan, chunk.tensor):
        if o.rank == me or o.rank not in t.dsts:
            continue
        full = whole.view(torch_dtype(o.dtype)).view(o.shape)
        part = byte_view(full.narrow(o.dim, o.start, o.stop - o.start).contiguous())
        stats.sent_bytes += part.numel()
        works.append(_Pending(dist.isend(part, o.rank, group=group.data_pg), part))
    return works
