"""The load planner: (CheckpointIndex, ClusterSpec, ClusterDeviceMap) -> LoadPlan.

Pure and deterministic: module-level functions over frozen dataclasses, no I/O. The same inputs
give a byte-identical plan JSON.

Vocabulary
----------
- ``Owned``: what one rank ends up holding: a whole tensor or a ``torch.chunk``-style slice of it
  along ``dim`` (rows ``[start, stop)``), on ``device``.
- ``Chunk``: the unit of reading and moving: a contiguous byte range of exactly one tensor
  (``tensor_offset`` is where it starts inside the tensor). Big tensors are split into chunks of at
  most ``PlanOptions.chunk_bytes``; a chunk is read from storage by exactly one ``reader`` (once per
  cluster on shared storage, once per node on node-local storage) and is needed by ``consumers``.
- ``ReadItem``: one storage request of a rank: a coalesced byte range of one file covering one or
  more chunks (gap bytes between chunks may be read when coalescing; they are counted).
- ``TransferItem``: bytes moving between ranks, in buckets every rank orders identically:
  ``broadcast`` (src -> every other rank of the world), ``send`` (src -> each rank of ``dsts``,
  point to point), ``scatter`` (src holds the whole tensor of the chunks; each dst receives only
  its own slice), ``hop`` (node-shared transport: one ring hop from ``src`` to ``dsts[0]`` on
  another node; ``step`` orders the hops of a chunk along its ring).

Which transfers exist depends on ``PlanOptions.transport``:
- ``collective``: every consumer that is not the reader receives the chunk's bytes (or its slice).
- ``node-shared``: ranks of one node share the node's page cache and staging area, so only bytes
  a node needs and did not read itself cross nodes, as ``hop`` items along one ring per rail.
"""
from __future__ import annotations

from dataclasses import dataclass


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
    bucket: int
    step: int = 0


@dataclass(frozen=True, slots=True)
class FileStamp:
    name: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class PlanOptions:
    transport: str = "collective"  # "collective" | "node-shared"
    chunk_bytes: int = 64 << 20
    bucket_bytes: int = 256 << 20
    gap_bytes: int = 0  # coalesce reads of one rank across gaps up to this size


@dataclass(frozen=True, slots=True)
class LoadPlan:
    world_size: int
    nodes: tuple[tuple[str, tuple[int, ...]], ...]  # node name -> its ranks
    storage: str
    options: PlanOptions
    files: tuple[FileStamp, ...]
    owned: tuple[Owned, ...]  # sorted by (rank, name)
    chunks: tuple[Chunk, ...]  # id == position
    reads: tuple[ReadItem, ...]  # sorted by (rank, file, offset)
    transfers: tuple[TransferItem, ...]  # in execution order
    checkpoint_bytes: int
    needed_bytes: int
