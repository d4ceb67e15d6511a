"""Byte ranges of the tensors inside a ``torch.save`` file (a zip archive), read safely.

``torch.save`` writes a zip archive (never compressed): ``<name>/data.pkl`` (the pickled object,
whose tensors refer to storages by key), ``<name>/byteorder``, ``<name>/version`` and one stored
entry ``<name>/data/<key>`` per tensor storage. :func:`parse_torch_save` reads only metadata:
the end-of-central-directory record (zip64 included), the central directory, each member's local
header, and ``data.pkl``; every offset and size is checked against the file size (members inside
the file, no two overlapping, stored uncompressed, storage sizes equal to what ``data.pkl``
declares), so nothing is ever read outside the file. ``data.pkl`` is interpreted only by torch's
weights-only unpickler (``torch._weights_only_unpickler``, the one ``torch.load(weights_only=True)``
uses), with storages replaced by placeholders on the meta device: no data byte is read and no
arbitrary object is built. The result maps every tensor of the object to its absolute byte range
(:class:`TensorRef`), as ``CheckpointIndex`` does for safetensors.

Called by the coordinator (rank 0) when it plans a training-state load; pure apart from importing
torch for the unpickler (no torch.distributed, no threads).
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from weightcast.orchestrator.errors import CheckpointFormatError, PickleRefusedError
from weightcast.orchestrator.safetensors_format import open_regular, pread_exact

MAX_PICKLE_BYTES = 1 << 30
MAX_MEMBERS = 10_000_000
_EOCD, _EOCD64, _LOC64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_CENTRAL, _LOCAL = b"PK\x01\x02", b"PK\x03\x04"
_U32 = 0xFFFFFFFF
_FIX = "the file is damaged or not written by torch.save: save it again (torch.save / Trainer)"


@dataclass(frozen=True, slots=True)
class ZipMember:
    """One stored member: its local header at ``header_offset``, its bytes at ``[offset, end)``."""
    name: str
    header_offset: int
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor of the saved object: ``length`` bytes at absolute ``offset`` (contiguous)."""
    storage: str  # the storage key (member ``data/<key>``)
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class TorchSaveIndex:
    """What :func:`parse_torch_save` found: the object with :class:`TensorRef` leaves."""
    path: str
    size: int
    mtime_ns: int
    prefix: str  # the archive's folder, e.g. "optimizer/"
    members: dict[str, ZipMember]
    obj: Any

    def tensors(self) -> Iterator[tuple[tuple, TensorRef]]:
        """``(path, ref)`` of every tensor, the path being the keys / indices leading to it."""
        yield from walk_refs(self.obj, ())


def _fail(what: str, path: str, **kw: Any) -> CheckpointFormatError:
    return CheckpointFormatError(what, where=f"file {path!r}", fix=kw.pop("fix", _FIX), **kw)


def parse_torch_save(path: str, *, max_pickle_bytes: int = MAX_PICKLE_BYTES) -> TorchSaveIndex:
    """Parse a ``torch.save`` file's metadata (see the module docstring). Raises
    :class:`CheckpointFormatError` for anything malformed, truncated or inconsistent and
    :class:`PickleRefusedError` for a pickle that is not weights-only."""
    fd, st = open_regular(path, os.path.basename(path))
    try:
        members = read_members(fd, st.st_size, path)
        prefix = _prefix(members, path)
        _check_records(fd, members, prefix, path)
        pkl = members[prefix + "data.pkl"]
        if pkl.size > max_pickle_bytes:
            raise _fail("data.pkl is too large", path, expected=f"at most {max_pickle_bytes:,} bytes",
                        got=f"{pkl.size:,} bytes")
        data = pread_exact(fd, pkl.size, pkl.offset, path) if pkl.size else b""
    finally:
        os.close(fd)
    obj = unpickle_refs(data, members, prefix, path)
    return TorchSaveIndex(os.path.abspath(path), st.st_size, st.st_mtime_ns, prefix, members, obj)


# ---------------------------------------------------------------- zip structure

def read_members(fd: int, size: int, path: str) -> dict[str, ZipMember]:
    """Every member of the archive (collective of nothing: one process), validated."""
    cd_offset, cd_size, count = _end_record(fd, size, path)
    if cd_offset + cd_size > size or count > MAX_MEMBERS:
        raise _fail("The zip central directory lies outside the file", path,
                    expected=f"within {size:,} bytes", got=f"offset {cd_offset:,} + {cd_size:,} bytes")
    raw = pread_exact(fd, cd_size, cd_offset, path)
    members: dict[str, ZipMember] = {}
    pos = 0
    for _ in range(count):
        member, pos = _central_entry(fd, raw, pos, cd_offset, path)
        if member.name in members:
            raise _fail("A zip member name appears twice", path, got=member.name)
        members[member.name] = member
    _check_no_overlap(members, cd_offset, path)
    return members


def _end_record(fd: int, size: int, path: str) -> tuple[int, int, int]:
    """(central directory offset, size, entry count) from the EOCD record (zip64 when needed)."""
    tail_len = min(size, 22 + 0xFFFF)
    if size < 22:
        raise _fail("The file is too short to be a torch.save zip archive (truncated?)", path,
                    got=f"{size} bytes")
    tail = pread_exact(fd, tail_len, size - tail_len, path)
    at = tail.rfind(_EOCD)
    if at < 0 or at + 22 > len(tail):
        raise _fail("No zip end-of-central-directory record (truncated, or not a torch.save file)", path,
                    expected="a zip archive written by torch.save (torch >= 1.6)")
    _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<4H2IH", tail, at + 4)
    eocd_pos = size - tail_len + at
    if count == 0xFFFF or cd_size == _U32 or cd_offset == _U32:
        return _zip64_end(fd, eocd_pos, path)
    return cd_offset, cd_size, count


def _zip64_end(fd: int, eocd_pos: int, path: str) -> tuple[int, int, int]:
    if eocd_pos < 20:
        raise _fail("A zip64 archive without its locator", path)
    loc = pread_exact(fd, 20, eocd_pos - 20, path)
    if loc[:4] != _LOC64:
        raise _fail("A zip64 archive without its locator", path)
    (rec_offset,) = struct.unpack_from("<Q", loc, 8)
    if rec_offset + 56 > eocd_pos:
        raise _fail("The zip64 end record lies outside the file", path, got=f"offset {rec_offset:,}")
    rec = pread_exact(fd, 56, rec_offset, path)
    if rec[:4] != _EOCD64:
        raise _fail("Bad zip64 end-of-central-directory record", path)
    _, count, cd_size, cd_offset = struct.unpack_from("<4Q", rec, 24)
    return cd_offset, cd_size, count


def _central_entry(fd: int, raw: bytes, pos: int, cd_offset: int, path: str) -> tuple[ZipMember, int]:
    if pos + 46 > len(raw) or raw[pos:pos + 4] != _CENTRAL:
        raise _fail("Bad zip central directory entry", path, got=f"at offset {cd_offset + pos:,}")
    (flags, method, csize, usize, nlen, xlen, clen) = struct.unpack_from("<2H8x2I3H", raw, pos + 8)
    (header_offset,) = struct.unpack_from("<I", raw, pos + 42)
    end = pos + 46 + nlen + xlen + clen
    if end > len(raw):
        raise _fail("A zip central directory entry runs past the directory", path)
    name = raw[pos + 46:pos + 46 + nlen].decode("utf-8", "replace")
    extra = raw[pos + 46 + nlen:pos + 46 + nlen + xlen]
    usize, csize, header_offset = _zip64_fields(extra, usize, csize, header_offset, path, name)
    if method != 0 or csize != usize or flags & 0x1:
        raise _fail("A zip member is compressed or encrypted: torch.save stores members uncompressed", path,
                  got=f"member {name!r}: method {method}, flags {flags:#x}")
    offset = _data_offset(fd, header_offset, cd_offset, name, path)
    if offset + usize > cd_offset:
        raise _fail("A zip member runs past the end of the data (truncated?)", path,
                    expected=f"member {name!r} to end by offset {cd_offset:,}", got=f"ends at {offset + usize:,}")
    return ZipMember(name, header_offset, offset, usize), end


def _zip64_fields(extra: bytes, usize: int, csize: int, header_offset: int, path: str,
                  name: str) -> tuple[int, int, int]:
    """Replace the 0xFFFFFFFF fields with the zip64 extra field's values, in the zip order."""
    wanted = [v == _U32 for v in (usize, csize, header_offset)]
    if not any(wanted):
        return usize, csize, header_offset
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, pos)
        if tag == 1:
            values = [usize, csize, header_offset]
            at = pos + 4
            for i, need in enumerate(wanted):
                if need:
                    if at + 8 > pos + 4 + length:
                        break
                    (values[i],) = struct.unpack_from("<Q", extra, at)
                    at += 8
            else:
                return values[0], values[1], values[2]
            break
        pos += 4 + length
    raise _fail("A zip64 member lacks its sizes", path, got=f"member {name!r}")


def _data_offset(fd: int, header_offset: int, cd_offset: int, name: str, path: str) -> int:
    if header_offset + 30 > cd_offset:
        raise _fail("A zip local header lies outside the data", path, got=f"member {name!r} at {header_offset:,}")
    local = pread_exact(fd, 30, header_offset, path)
    if local[:4] != _LOCAL:
        raise _fail("Bad zip local header", path, got=f"member {name!r} at offset {header_offset:,}")
    nlen, xlen = struct.unpack_from("<2H", local, 26)
    return header_offset + 30 + nlen + xlen


def _check_no_overlap(members: dict[str, ZipMember], cd_offset: int, path: str) -> None:
    spans = sorted((m.header_offset, m.end, m.name) for m in members.values())
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _fail("Two zip members overlap", path, got=f"{an!r} ends at {a1:,}, {bn!r} starts at {b0:,}")


def _prefix(members: dict[str, ZipMember], path: str) -> str:
    pkls = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise _fail("A torch.save archive holds exactly one <name>/data.pkl", path,
                    got=f"{len(pkls)} candidates: {sorted(pkls)[:5]}")
    return pkls[0][: -len("data.pkl")]


def _check_records(fd: int, members: dict[str, ZipMember], prefix: str, path: str) -> None:
    """``byteorder`` must say ``little`` (when present) and ``version`` be a small integer."""
    bo = members.get(prefix + "byteorder")
    if bo is not None:
        value = pread_exact(fd, bo.size, bo.offset, path) if 0 < bo.size <= 16 else b"?"
        if value != b"little":
            raise _fail("Only little-endian torch.save files are supported", path, expected="byteorder 'little'",
                        got=repr(value[:16]), fix="load and save the file again on a little-endian machine")
    ver = members.get(prefix + "version")
    if ver is None or not 0 < ver.size <= 8:
        raise _fail("The archive has no valid version record", path, expected=f"{prefix}version")
    text = pread_exact(fd, ver.size, ver.offset, path).strip()
    if not text.isdigit():
        raise _fail("The archive's version record is not a number", path, got=repr(text))


# ---------------------------------------------------------------- data.pkl

def unpickle_refs(data: bytes, members: dict[str, ZipMember], prefix: str, path: str) -> Any:
    """``data.pkl`` through torch's weights-only unpickler, storages as meta placeholders; every
    tensor is then replaced by its :class:`TensorRef`."""
    import pickle

    import torch
    from torch._weights_only_unpickler import Unpickler
    keys: dict[int, tuple[str, Any]] = {}  # storage _cdata -> (key, placeholder kept alive)
    storages: dict[str, Any] = {}

    def persistent_load(saved_id: Any) -> Any:
        return _placeholder(saved_id, members, prefix, path, keys, storages)

    unpickler = Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        obj = unpickler.load()
    except CheckpointFormatError:
        raise
    except pickle.UnpicklingError as exc:
        raise PickleRefusedError("data.pkl is not a weights-only pickle", where=f"file {path!r}",
                                 got=str(exc)[:500], expected="tensors, containers and plain values only",
                                 fix="only load files from sources you trust; re-save the state with torch.save "
                                     "of plain tensors (optimizer.state_dict())") from None
    except Exception as exc:  # noqa: BLE001 - malformed pickles raise many kinds of errors
        raise _fail("data.pkl cannot be parsed", path, got=f"{type(exc).__name__}: {str(exc)[:300]}") from None
    return _replace(obj, keys, members, prefix, path, torch)


def _placeholder(saved_id: Any, members: dict[str, ZipMember], prefix: str, path: str,
                 keys: dict[int, tuple[str, Any]], storages: dict[str, Any]) -> Any:
    import torch
    if not isinstance(saved_id, tuple) or len(saved_id) != 5:
        raise _fail("data.pkl refers to a storage in an unknown form", path, got=repr(saved_id)[:200])
    _, storage_type, key, _location, numel = saved_id
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    if key in storages:
        return storages[key]
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
    if not isinstance(numel, int) or numel < 0:
        raise _fail("data.pkl declares a storage of negative size", path, got=f"storage {key!r}: {numel!r}")
    nbytes = numel * torch._utils._element_size(dtype)
    member = members.get(f"{prefix}data/{key}")
    if member is None or member.size != nbytes:
        raise _fail("A storage's bytes do not match data.pkl (truncated or altered file)", path,
                    expected=f"member {prefix}data/{key} of {nbytes:,} bytes",
                    got="no such member" if member is None else f"{member.size:,} bytes")
    untyped = torch.UntypedStorage(nbytes, device="meta")
    keys[untyped._cdata] = (key, untyped)
    typed = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
    storages[key] = typed
    return typed


def _replace(obj: Any, keys: dict[int, tuple[str, Any]], members: dict[str, ZipMember], prefix: str,
             path: str, torch: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _ref(obj, keys, members, prefix, path, torch)
    if isinstance(obj, dict):
        return type(obj)((k, _replace(v, keys, members, prefix, path, torch)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_replace(v, keys, members, prefix, path, torch) for v in obj)
    return obj


def _ref(t: Any, keys: dict[int, tuple[str, Any]], members: dict[str, ZipMember], prefix: str,
         path: str, torch: Any) -> TensorRef:
    found = keys.get(t.untyped_storage()._cdata)
    if found is None or type(t) is not torch.Tensor:
        raise _fail("A tensor of data.pkl has no storage in the archive", path, got=f"{type(t).__name__}")
    key = found[0]
    member = members[f"{prefix}data/{key}"]
    item = t.element_size()
    numel = t.numel()
    if numel > 1 and not t.is_contiguous():
        raise _fail("A saved tensor is not contiguous", path, got=f"storage {key!r}, stride {t.stride()}",
                    fix="save contiguous tensors (tensor.contiguous()) or load this file with torch.load")
    start = t.storage_offset() * item
    if start + numel * item > member.size:
        raise _fail("A saved tensor runs past its storage", path,
                    got=f"storage {key!r}: bytes {start:,}..{start + numel * item:,} of {member.size:,}")
    dtype = str(t.dtype).removeprefix("torch.")
    return TensorRef(key, dtype, tuple(t.shape), member.offset + start, numel * item)


def walk_refs(obj: Any, path: tuple) -> Iterator[tuple[tuple, TensorRef]]:
    """Every :class:`TensorRef` under ``obj`` with the keys / indices leading to it."""
    if isinstance(obj, TensorRef):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_refs(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk_refs(v, (*path, i))
