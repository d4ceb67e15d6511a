"""Writing a ``torch.save``-compatible zip archive whose storages are written by many processes.

The layout is computed up front (:func:`zip_layout`): every member's local header offset and its
data offset (aligned to 64 bytes, as torch aligns storages) follow from the member sizes alone, so
each rank can ``pwrite`` the bytes it holds (a whole storage, or the rows of a ``Shard(0)`` one) at
their final place while the others do the same. Rank 0 then writes the local headers, the small
members (``data.pkl``, ``byteorder``, ``version``), the central directory and the end records
(zip64 when an offset or size needs it) with the CRC-32 of each member, combined from the ranks'
segment CRCs (:func:`crc32_combine`). ``torch.load`` and :func:`weightcast.orchestrator.torch_zip.parse_torch_save`
read the result.

:func:`state_pickle` makes ``data.pkl`` for an object whose tensors are described by
:class:`StorageSpec` (dtype, shape): the same opcodes ``torch.save`` emits (``persistent_id`` of
``("storage", torch.<Type>Storage, key, "cpu", numel)`` and ``torch._utils._rebuild_tensor_v2``),
so the weights-only unpickler accepts it. Pure (no torch.distributed, no threads).
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Sequence

ALIGN = 64
_U32 = 0xFFFFFFFF
_PAD_TAG = 0x4246  # the "FB" extra field torch uses to align storages


@dataclass(frozen=True, slots=True)
class StorageSpec:
    """A tensor of the object to save: its storage ``key``, torch dtype name, full shape."""
    key: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class MemberLayout:
    name: str
    header_offset: int
    offset: int  # data
    size: int
    zip64: bool


def _needs64(*values: int) -> bool:
    return any(v >= _U32 for v in values)


def _local_extra(header_offset: int, name: bytes, size: int) -> tuple[bytes, bool]:
    """The local header's extra field: zip64 sizes when needed, then padding to ALIGN."""
    z64 = _needs64(size, header_offset)
    extra = struct.pack("<2H2Q", 1, 16, size, size) if z64 else b""
    base = header_offset + 30 + len(name) + len(extra) + 4
    pad = -base % ALIGN
    return extra + struct.pack("<2H", _PAD_TAG, pad) + b"Z" * pad, z64


def zip_layout(names_sizes: Sequence[tuple[str, int]]) -> tuple[list[MemberLayout], int]:
    """Offsets of every member written in order; returns the members and where the central
    directory starts."""
    out, pos = [], 0
    for name, size in names_sizes:
        raw = name.encode("utf-8")
        extra, z64 = _local_extra(pos, raw, size)
        offset = pos + 30 + len(raw) + len(extra)
        out.append(MemberLayout(name, pos, offset, size, z64))
        pos = offset + size
    return out, pos


def local_header(m: MemberLayout, crc: int) -> bytes:
    raw = m.name.encode("utf-8")
    extra, z64 = _local_extra(m.header_offset, raw, m.size)
    size = _U32 if z64 else m.size
    return struct.pack("<I5H3I2H", 0x04034B50, 45 if z64 else 20, 0, 0, 0, 0, crc, size, size,
                       len(raw), len(extra)) + raw + extra


def central_directory(members: Sequence[MemberLayout], crcs: Sequence[int], cd_offset: int) -> bytes:
    """Central directory and end records (zip64 ones when any value needs 64 bits)."""
    parts = []
    for m, crc in zip(members, crcs):
        raw = m.name.encode("utf-8")
        big = _needs64(m.size, m.header_offset)
        extra = struct.pack("<2H3Q", 1, 24, m.size, m.size, m.header_offset) if big else b""
        size, off = (_U32, _U32) if big else (m.size, m.header_offset)
        parts.append(struct.pack("<I6H3I5H2I", 0x02014B50, 45, 45 if big else 20, 0, 0, 0, 0, crc, size, size,
                                 len(raw), len(extra), 0, 0, 0, 0, off) + raw + extra)
    cd = b"".join(parts)
    count, end = len(members), cd_offset + len(cd)
    tail = b""
    if _needs64(cd_offset, len(cd), end) or count >= 0xFFFF:
        tail = struct.pack("<IQ2H2I4Q", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(cd), cd_offset)
        tail += struct.pack("<2IQI", 0x07064B50, 0, end, 1)
        count16, size32, off32 = 0xFFFF, _U32, _U32
    else:
        count16, size32, off32 = count, len(cd), cd_offset
    return cd + tail + struct.pack("<I4H2IH", 0x06054B50, 0, 0, count16, count16, size32, off32, 0)


# ---------------------------------------------------------------- CRC-32 of segments

def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's crc32_combine)."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << (n - 1) for n in range(1, 32)]
    even = _gf2_square(odd)
    odd = _gf2_square(even)
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def combine_segments(segments: Sequence[tuple[int, int, int]], size: int) -> int:
    """CRC-32 of a member from ``(start, length, crc)`` segments covering ``[0, size)`` exactly."""
    crc, pos = 0, 0
    for start, length, seg in sorted(segments):
        if start != pos:
            raise ValueError(f"segments leave a gap or overlap at byte {pos} (next starts at {start})")
        crc = crc32_combine(crc, seg, length)
        pos += length
    if pos != size:
        raise ValueError(f"segments cover {pos} of {size} bytes")
    return crc


# ---------------------------------------------------------------- data.pkl

class _Storage:
    def __init__(self, spec: StorageSpec) -> None:
        self.spec = spec


class _Pickler(pickle.Pickler):
    def __init__(self, f: Any, torch: Any) -> None:
        super().__init__(f, protocol=2)
        self.torch = torch

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            s = obj.spec
            storage_type = getattr(self.torch, _STORAGE_TYPES[s.dtype])
            return ("storage", storage_type, s.key, "cpu", s.nbytes // s.itemsize)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, StorageSpec):
            stride, acc = [], 1
            for d in reversed(obj.shape):
                stride.insert(0, acc)
                acc *= d
            return (self.torch._utils._rebuild_tensor_v2,
                    (_Storage(obj), 0, tuple(obj.shape), tuple(stride), False, collections.OrderedDict()))
        return NotImplemented


_STORAGE_TYPES = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
                  "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
                  "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


def state_pickle(obj: Any) -> bytes:
    """``data.pkl`` of ``obj`` whose tensors are :class:`StorageSpec` leaves (see the module docstring)."""
    import torch
    buf = io.BytesIO()
    _Pickler(buf, torch).dump(obj)
    return buf.getvalue()
