"""A rank's tensors as views of the node's mappings (the last step of the node-shared transport).

Zero-copy views where the layout allows (whole tensors, dim-0 slices); dim>0 slices and
misaligned tensors are one private copy of exactly what the rank owns. A tensor whose bytes
come partly from the page cache and partly from a staging area is a view of the area, which
the node's readers completed while reading (:mod:`weightcast.workers.mirror`). Per rank, not collective
(called after the node's barrier).
"""
from __future__ import annotations

from typing import Any

import torch

from weightcast.orchestrator.planner import Chunk, LoadPlan
from weightcast.workers.layout import OwnedLayout, local_shape, owned_by, torch_dtype, view_bytes_as
from weightcast.workers.staging_areas import Areas, FileMaps


def node_of(plan: LoadPlan, rank: int) -> str:
    for name, ranks in plan.nodes:
        if rank in ranks:
            return name
    raise KeyError(rank)


def build_views(plan: LoadPlan, rank: int, maps: Any, areas: Areas,
                 staged: bool = False) -> dict[str, torch.Tensor]:
    my_node = node_of(plan, rank)
    node_ranks = set(dict(plan.nodes)[my_node])
    layouts = owned_by(plan, rank)
    per_tensor: dict[str, list[Chunk]] = {}
    for c in plan.chunks:
        if c.tensor in layouts:
            per_tensor.setdefault(c.tensor, []).append(c)
    shm_maps: dict[str, torch.Tensor] = {}
    out = {}
    for name, lay in layouts.items():
        chunks = [c for c in per_tensor.get(name, []) if _overlaps(lay, c) and (set(c.consumers) & node_ranks)]
        out[name] = _tensor_for(lay, chunks, set() if staged else node_ranks, maps, shm_maps, areas)
    return out


def _overlaps(lay: OwnedLayout, c: Chunk) -> bool:
    return c.tensor_offset < lay.start + lay.length and lay.start < c.tensor_offset + c.length


def _tensor_for(lay: OwnedLayout, chunks: list[Chunk], node_ranks: set[int], maps: FileMaps,
                shm_maps: dict, areas: Areas) -> torch.Tensor:
    o = lay.owned
    shape = local_shape(o)
    if not chunks:
        return torch.empty(shape, dtype=torch_dtype(o.dtype))
    local = [c.reader in node_ranks for c in chunks]
    first = chunks[0]
    base = first.offset - first.tensor_offset  # absolute file offset of the tensor
    lo, hi = base + lay.start, base + lay.start + lay.length

    def source(is_local: bool) -> torch.Tensor:
        if is_local:
            return maps.get(first.file)
        if first.file not in shm_maps:
            areas.hold(first.file)
            storage = torch.UntypedStorage.from_file(areas.path(first.file), shared=False,
                                                     nbytes=areas.sizes[first.file])
            shm_maps[first.file] = torch.empty(0, dtype=torch.uint8).set_(storage)
        return shm_maps[first.file]

    # bytes partly read here, partly received: the node's readers mirrored their part into the
    # area while reading (workers/mirror.py), so the area holds the whole range
    raw = source(all(local))[lo:hi]
    if lay.contiguous:
        return view_bytes_as(raw, o.dtype, shape)
    full = view_bytes_as(raw, o.dtype, o.shape)
    return full.narrow(o.dim, o.start, o.stop - o.start).contiguous()
