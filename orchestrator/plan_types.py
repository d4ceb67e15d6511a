"""The load plan's data types (a leaf module): ``Owned``, ``Chunk``, ``ReadItem``,
``TransferItem``, ``FileStamp``, ``PlanOptions``, ``OwnedRow``, ``OwnedTable``, ``LoadPlan``.

Frozen, slotted data; see :mod:`weightcast.orchestrator.planner` for their vocabulary. The
planner's steps (``plan_build``, ``plan_transfers``) and the codec (``plan_codec``) import them
from here, so none of them imports the planner back.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload


@dataclass(frozen=True, slots=True)
class Owned:
    rank: int
    name: str
    dtype: str
    shape: tuple[int, ...]  # the full tensor's shape
    dim: int | None  # None: whole tensor; else the slice rows [start, stop) along dim
    start: int
    stop: int
    device: str


@dataclass(frozen=True, slots=True)
class Chunk:
    id: int
    tensor: str
    file: str
    offset: int  # absolute file offset
    length: int
    tensor_offset: int  # byte offset inside the tensor
    reader: int
    consumers: tuple[int, ...]  # sorted ranks that need these bytes


@dataclass(frozen=True, slots=True)
class ReadItem:
    rank: int
    file: str
    offset: int
    length: int
    chunks: tuple[int, ...]  # chunk ids, in file order


@dataclass(frozen=True, slots=True)
class TransferItem:
    kind: str  # "broadcast" | "send" | "scatter" | "hop"
    src: int
    dsts: tuple[int, ...]
    chunks: tuple[int, ...]
    bucket: int  # bucket number; items of one bucket move the same chunks
    step: int = 0  # hop index along the chunk's ring (0: from the reader's node)
    round: int = 0  # execution round: non-decreasing in list order


@dataclass(frozen=True, slots=True)
class FileStamp:
    name: str
    size: int
    mtime_ns: int
    etag: str | None = None  # object storage: reads must see this ETag


@dataclass(frozen=True, slots=True)
class PlanOptions:
    transport: str = "collective"  # "collective" | "node-shared"
    chunk_bytes: int = 64 << 20
    bucket_bytes: int = 256 << 20
    gap_bytes: int = 0  # coalesce reads of one rank across gaps up to this size


@dataclass(frozen=True, slots=True)
class OwnedRow:
    """One compact row of an :class:`OwnedTable`: every rank of ``ranks`` owns the same slice.
    ``device`` None means each rank's own device (``OwnedTable.devices``)."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    dim: int | None
    start: int
    stop: int
    device: str | None
    ranks: tuple[int, ...]


class OwnedTable(Sequence):
    """A read-only sequence of :class:`Owned` sorted by (rank, name), stored as rows shared by
    many ranks so a replicated 1000-tensor model on 1024 ranks costs 1000 rows, not a million
    objects. ``for_rank`` is the fast per-rank view; iterating everything builds every object."""

    __slots__ = ("rows", "devices", "_len", "_by_rank", "_all")

    def __init__(self, rows: Iterable[OwnedRow], devices: Sequence[str]) -> None:
        self.rows: tuple[OwnedRow, ...] = tuple(sorted(rows, key=lambda r: (r.name, r.ranks)))
        self.devices: tuple[str, ...] = tuple(devices)
        self._len = sum(len(r.ranks) for r in self.rows)
        self._by_rank: dict[int, tuple[Owned, ...]] = {}
        self._all: tuple[Owned, ...] | None = None

    @classmethod
    def from_owned(cls, owned: Iterable[Owned], devices: Sequence[str]) -> "OwnedTable":
        """Compact a plain sequence of Owned (device equal to the rank's own kept implicit)."""
        groups: dict[tuple, list[int]] = {}
        for o in owned:
            dev = None if o.rank < len(devices) and devices[o.rank] == o.device else o.device
            key = (o.name, o.dtype, o.shape, o.dim, o.start, o.stop, dev)
            groups.setdefault(key, []).append(o.rank)
        return cls((OwnedRow(*k, tuple(sorted(v))) for k, v in groups.items()), devices)

    def _make(self, row: OwnedRow, rank: int) -> Owned:
        device = row.device if row.device is not None else self.devices[rank]
        return Owned(rank, row.name, row.dtype, row.shape, row.dim, row.start, row.stop, device)

    def for_rank(self, rank: int) -> tuple[Owned, ...]:
        """What ``rank`` owns, sorted by name (cached)."""
        got = self._by_rank.get(rank)
        if got is None:
            got = tuple(self._make(r, rank) for r in self.rows if rank in r.ranks)
            self._by_rank[rank] = got
        return got

    def _materialize(self) -> tuple[Owned, ...]:
        if self._all is None:
            per_rank: dict[int, list[OwnedRow]] = {}
            for row in self.rows:
                for r in row.ranks:
                    per_rank.setdefault(r, []).append(row)
            self._all = tuple(self._make(row, r) for r in sorted(per_rank) for row in per_rank[r])
        return self._all

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Owned]:
        return iter(self._materialize())

    @overload
    def __getitem__(self, i: int) -> Owned: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Owned, ...]: ...
    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self._materialize()[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OwnedTable):
            return self.rows == other.rows and (
                self.devices == other.devices or tuple(self) == tuple(other))
        if isinstance(other, (tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.rows, self.devices))

    def __repr__(self) -> str:
        return f"OwnedTable({self._len} owned, {len(self.rows)} rows)"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    world_size: int
    nodes: tuple[tuple[str, tuple[int, ...]], ...]  # node name -> its ranks
    storage: str
    options: PlanOptions
    files: tuple[FileStamp, ...]
    owned: OwnedTable | tuple[Owned, ...]  # sorted by (rank, name)
    chunks: tuple[Chunk, ...]  # id == position
    reads: tuple[ReadItem, ...]  # sorted by (rank, file, offset)
    transfers: tuple[TransferItem, ...]  # in execution order
    checkpoint_bytes: int
    needed_bytes: int
    devices: tuple[str, ...] = field(default=())  # each rank's device


def owned_table(plan: LoadPlan) -> OwnedTable:
    """``plan.owned`` as an :class:`OwnedTable` (a hand-built plan may hold a plain tuple)."""
    if isinstance(plan.owned, OwnedTable):
        return plan.owned
    devices = plan.devices or tuple("cpu" for _ in range(plan.world_size))
    return OwnedTable.from_owned(plan.owned, devices)
