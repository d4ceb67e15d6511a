"""Where a chunk's bytes go inside what a rank owns. Pure helpers shared by both transports.

An owned tensor (or dim-0 slice) is one contiguous byte range of the checkpoint tensor; a chunk
is a contiguous byte range of one tensor. ``chunk_region`` maps one onto the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from weightcast.orchestrator.planner import Chunk, LoadPlan, Owned

_DTYPES: dict[str, torch.dtype] = {}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"BF16"`` -> ``torch.bfloat16``), cached."""
    found = _DTYPES.get(code)
    if found is None:
        from weightcast.orchestrator.safetensors_dtypes import torch_dtype as lookup
        found = _DTYPES[code] = lookup(code)
    return found


def itemsize(code: str) -> int:
    return torch.empty((), dtype=torch_dtype(code)).element_size()


@dataclass(frozen=True, slots=True)
class OwnedLayout:
    """Byte range of an owned tensor inside the full checkpoint tensor (dim None or 0), or the
    whole tensor for a dim>0 shard (those are cut out of the whole tensor after it arrives)."""
    owned: Owned
    start: int  # byte offset inside the full tensor
    length: int
    row_bytes: int

    @property
    def contiguous(self) -> bool:
        return self.owned.dim in (None, 0) or len(self.owned.shape) == 0


def owned_layout(o: Owned) -> OwnedLayout:
    n = math.prod(o.shape)
    size = itemsize(o.dtype)
    total = n * size
    if not o.shape:
        return OwnedLayout(o, 0, total, total)
    row = total // o.shape[0] if o.shape[0] else 0
    if o.dim == 0:
        return OwnedLayout(o, o.start * row, (o.stop - o.start) * row, row)
    return OwnedLayout(o, 0, total, row)


def local_shape(o: Owned) -> tuple[int, ...]:
    if o.dim is None or not o.shape:
        return o.shape
    shape = list(o.shape)
    shape[o.dim] = o.stop - o.start
    return tuple(shape)


def chunk_region(layout: OwnedLayout, chunk: Chunk) -> tuple[int, int] | None:
    """(offset inside the owned bytes, length) of the part of ``chunk`` this owner keeps, or
    None when the chunk is outside it."""
    lo = max(layout.start, chunk.tensor_offset)
    hi = min(layout.start + layout.length, chunk.tensor_offset + chunk.length)
    if hi <= lo:
        return None
    return lo - layout.start, hi - lo


def owned_by(plan: LoadPlan, rank: int) -> dict[str, OwnedLayout]:
    from weightcast.orchestrator.planner import owned_of
    return {o.name: owned_layout(o) for o in owned_of(plan, rank)}


def owners_of(plan: LoadPlan, tensor: str) -> list[Owned]:
    """Every rank's Owned entry of one tensor."""
    from weightcast.orchestrator.planner import owned_table
    table = owned_table(plan)
    return [table._make(row, r) for row in table.rows if row.name == tensor for r in row.ranks]


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (no copy)."""
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def view_bytes_as(buf: torch.Tensor, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """View uint8 ``buf`` as a tensor of dtype ``code`` and ``shape``; copies only when the
    bytes are misaligned for the dtype."""
    dt = torch_dtype(code)
    size = torch.empty((), dtype=dt).element_size()
    if buf.numel() == 0:
        return torch.empty(shape, dtype=dt, device=buf.device)
    if (buf.storage_offset() % size) != 0:
        buf = buf.clone()
    return buf.view(dt).view(shape)
