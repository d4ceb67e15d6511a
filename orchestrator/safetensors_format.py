"""Strict parser and validator for safetensors headers and ``model.safetensors.index.json``.

Called by :func:`weightcast.orchestrator.checkpoint.load_index` (rank 0, or whoever builds the index).
The dtype facts (:data:`DTYPE_BITS`, :func:`torch_dtype`, ...) live in
:mod:`weightcast.orchestrator.safetensors_dtypes` and are re-exported here. Nothing here maps a file
or reads tensor data: :func:`read_header` issues two bounded ``os.pread`` calls (the 8-byte
length, then exactly the header) and never reads past ``8 + header length``.

Everything read from disk is untrusted. A header must be: an 8-byte little-endian length of at
most :data:`MAX_HEADER_BYTES`; UTF-8 JSON starting with ``{`` and holding one object without
duplicate keys; ``__metadata__`` a str -> str object; every tensor ``{"dtype", "shape",
"data_offsets"}`` with a known dtype, non-negative integer dims, ``end - begin == numel x
itemsize``; offsets sorted, contiguous from 0, no gap or overlap, and the data region exactly as
long as the file says. Any violation raises a :class:`~orchestrator.errors.WeightcastError`
subclass naming the file (and tensor), the expected and the found value, and the fix.
"""
from __future__ import annotations

import gc
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable

from weightcast.orchestrator.errors import CheckpointFormatError, StorageError, UnsafePathError
from weightcast.orchestrator.safetensors_dtypes import (DTYPE_BITS, check_loadable_dtypes,  # noqa: F401 - re-exported
                                                        dtype_itemsize_bytes, tensor_nbytes, torch_dtype)

MAX_HEADER_BYTES = 100_000_000
"""Largest header safetensors accepts (its own limit)."""

MAX_INDEX_BYTES = 100_000_000
"""Largest ``*.safetensors.index.json`` accepted."""

MAX_TENSORS = 400_000
"""Most tensors accepted in one checkpoint (and so in one header), checked before the JSON is
parsed. The largest published checkpoints hold about 150k tensors (per-expert MoE weights and
their scales); planning costs grow with the count (BENCHMARKS.md: about 10 s per 100k tensors
here), so a header at the format's 100 MB limit (about 1.4M tiny tensors) is refused instead of
planned for minutes. Raise it (``safetensors_format.MAX_TENSORS = ...``) for a bigger real one."""

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")

_MAX_DIM = 2**62  # far beyond any real tensor; keeps numel x bits inside 64-bit arithmetic

_FIX_FILE = ("re-download the file or re-save it with safetensors "
             "(safetensors.torch.save_file / save_pretrained)")
_TENSOR_KEYS = frozenset(("dtype", "shape", "data_offsets"))


@dataclass(frozen=True, slots=True)
class HeaderTensor:
    """One tensor of a header; ``begin``/``end`` are relative to the data region (after 8 + N)."""
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _fail(what: str, file_name: str, tensor: str | None = None, *, expected: object = None,
          got: object = None, fix: str | None = _FIX_FILE) -> CheckpointFormatError:
    where = f"file {file_name!r}" + (f", tensor {tensor!r}" if tensor is not None else "")
    return CheckpointFormatError(what, where=where, expected=expected, got=got, fix=fix)


class _DuplicateKey(Exception):
    pass


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads_strict(text: str) -> Any:
    """json.loads rejecting duplicate keys and NaN/Infinity (raises _DuplicateKey / ValueError)."""
    return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constants)


def _decode_json(raw: bytes, file_name: str, what: str, *, brace_first: bool = True) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(f"The {what} is not valid UTF-8", file_name, got=str(exc)) from None
    if not (text if brace_first else text.lstrip(" \t\r\n")).startswith("{"):
        raise _fail(f"The {what} is not a JSON object", file_name, expected="text starting with '{'",
                    got=repr(text[:40]))
    try:
        return _loads_strict(text)
    except _DuplicateKey as exc:
        raise _fail(f"The {what} has a duplicate key", file_name, got=repr(exc.args[0])) from None
    except (ValueError, RecursionError) as exc:
        raise _fail(f"The {what} is not valid JSON", file_name, got=str(exc)[:200]) from None


def check_tensor_count(count: int, file_name: str, what: str) -> None:
    """Refuse more than :data:`MAX_TENSORS` tensors (before anything is planned)."""
    if count > MAX_TENSORS:
        raise _fail(f"The {what} lists more tensors than weightcast plans", file_name,
                    expected=f"at most MAX_TENSORS = {MAX_TENSORS:,} tensors", got=f"{count:,} tensors",
                    fix="if this is a real checkpoint, raise weightcast.orchestrator.safetensors_format."
                        "MAX_TENSORS (planning takes about 10 s per 100k tensors); else re-save it")


def check_utf8_names(raw: bytes, names: Any, file_name: str, what: str) -> None:
    """Refuse names holding a lone UTF-16 surrogate (``\\ud800`` escapes decode to strings that
    are not valid UTF-8: safetensors and file systems reject them later). Only scans the names
    when ``raw`` holds a surrogate escape at all (fast path: one regex search)."""
    if _SURROGATE_ESCAPE.search(raw) is None:
        return
    for name in names:
        if not isinstance(name, str):  # the type checks that follow name the value
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(f"A name in the {what} is not valid UTF-8 (a lone surrogate escape)", file_name,
                        expected="names that are valid Unicode text", got=ascii(name)[:200]) from None


def _parse_metadata(value: Any, file_name: str) -> dict[str, str]:
    if value is None:
        return {}
    if type(value) is not dict:
        raise _fail("__metadata__ is not a JSON object", file_name, expected="{str: str}",
                    got=type(value).__name__)
    for key, item in value.items():
        if type(item) is not str:
            raise _fail("__metadata__ holds a non-string value", file_name,
                        expected=f"a string for key {key!r}", got=f"{type(item).__name__} {item!r}"[:120])
    return value


def _parse_shape(shape: Any, file_name: str, name: str) -> tuple[int, ...]:
    if type(shape) is not list:
        raise _fail("Tensor shape is not a list", file_name, name, expected="a list of ints",
                    got=repr(shape)[:80])
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim > _MAX_DIM:
            raise _fail("Tensor shape has an invalid dimension", file_name, name,
                        expected="integers in [0, 2**62]", got=repr(shape)[:120])
    return tuple(shape)


def _parse_offsets(offsets: Any, file_name: str, name: str) -> tuple[int, int]:
    if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int
            or type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1]):
        raise _fail("Tensor data_offsets are invalid", file_name, name,
                    expected="[begin, end] with integers 0 <= begin <= end", got=repr(offsets)[:120])
    return offsets[0], offsets[1]


def _parse_tensor(name: str, info: Any, file_name: str) -> HeaderTensor:
    if type(info) is not dict or info.keys() != _TENSOR_KEYS:
        got = sorted(info) if type(info) is dict else type(info).__name__
        raise _fail("Tensor entry is malformed", file_name, name,
                    expected='an object with exactly "dtype", "shape", "data_offsets"', got=got)
    dtype = info["dtype"]
    bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
    if bits is None:
        raise _fail("Unknown dtype", file_name, name, expected=f"one of {sorted(DTYPE_BITS)}",
                    got=repr(dtype)[:80], fix="upgrade safetensors/weightcast or convert the tensor")
    shape = _parse_shape(info["shape"], file_name, name)
    begin, end = _parse_offsets(info["data_offsets"], file_name, name)
    numel = 1
    for dim in shape:
        numel *= dim
    nbits = numel * bits
    if nbits % 8 or end - begin != nbits // 8:
        raise _fail("Tensor byte length does not match its dtype and shape", file_name, name,
                    expected=f"end - begin = {nbits / 8:g} bytes for {dtype}{list(shape)}",
                    got=f"data_offsets [{begin}, {end}] ({end - begin} bytes)")
    return HeaderTensor(dtype, shape, begin, end)


def _fast_tensors(obj: dict[str, Any], file_name: str) -> tuple[dict[str, HeaderTensor], list]:
    """The hot loop: validate every entry with inline checks; on the first doubt, hand the entry
    to :func:`_parse_tensor` (which raises the precise error). -> (tensors, [(begin, end, name)])."""
    bits_of, keys, max_dim = DTYPE_BITS, _TENSOR_KEYS, _MAX_DIM
    tensors: dict[str, HeaderTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in obj.items():
        ok = type(info) is dict and info.keys() == keys
        if ok:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            bits = bits_of.get(dtype) if type(dtype) is str else None
            ok = (bits is not None and type(shape) is list and type(offsets) is list
                  and len(offsets) == 2)
        if ok:
            numel = 1
            for dim in shape:
                if type(dim) is not int or not 0 <= dim <= max_dim:
                    ok = False
                    break
                numel *= dim
            begin, end = offsets
            ok = (ok and type(begin) is int and type(end) is int and 0 <= begin <= end
                  and (end - begin) * 8 == numel * bits)
        t = HeaderTensor(dtype, tuple(shape), begin, end) if ok else _parse_tensor(name, info, file_name)
        tensors[name] = t
        spans.append((t.begin, t.end, name))
    return tensors, spans


def _check_coverage(spans: list[tuple[int, int, str]], file_name: str, data_size: int | None) -> None:
    """Offsets sorted, contiguous from 0 (no gap, no overlap), data region exactly covered."""
    expected = 0
    spans.sort()
    for begin, end, name in spans:
        if begin != expected:
            what = "gap before" if begin > expected else "overlap at"
            raise _fail(f"Tensor data is not contiguous ({what} this tensor)", file_name, name,
                        expected=f"begin offset {expected}", got=f"{begin}")
        expected = end
    if data_size is not None and expected != data_size:
        what = ("The file has trailing bytes after the last tensor" if data_size > expected
                else "The file is shorter than its header says (truncated data)")
        raise _fail(what, file_name, expected=f"{expected} data bytes after the header",
                    got=f"{data_size} bytes")


def parse_header_bytes(raw: bytes, file_name: str, *, data_size: int | None = None
                       ) -> tuple[dict[str, HeaderTensor], dict[str, str]]:
    """Validate the JSON header ``raw`` (the N bytes after the length) -> (tensors, __metadata__).

    ``data_size`` (file size - 8 - N), when given, must equal the end of the last tensor.
    Pure; called by :func:`read_header` and by property tests.
    """
    check_tensor_count(raw.count(b'"data_offsets"'), file_name, "safetensors header")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # parsing allocates one container per tensor: collections would only cost time
    try:
        obj = _decode_json(raw, file_name, "safetensors header")
        if type(obj) is not dict:
            raise _fail("The safetensors header is not a JSON object", file_name,
                        got=type(obj).__name__)
        metadata = _parse_metadata(obj.pop("__metadata__", None), file_name)
        check_utf8_names(raw, [*obj, *metadata, *metadata.values()], file_name, "safetensors header")
        tensors, spans = _fast_tensors(obj, file_name)
    finally:
        if gc_was_enabled:
            gc.enable()
    _check_coverage(spans, file_name, data_size)
    return tensors, metadata


def pread_exact(fd: int, n: int, offset: int, file_name: str) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = os.pread(fd, n - got, offset + got)
        except OSError as exc:
            raise StorageError(f"Reading the header failed: {exc.strerror}", where=f"file {file_name!r}",
                               fix="check the storage and the file's permissions") from exc
        if not chunk:
            raise _fail("The file ended inside its header (truncated)", file_name,
                        expected=f"{n} bytes at offset {offset}", got=f"{got} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_header_fd(fd: int, file_name: str, file_size: int
                   ) -> tuple[int, dict[str, HeaderTensor], dict[str, str]]:
    """Read and validate the header of an open file of ``file_size`` bytes.

    Reads exactly 8 bytes, then exactly the declared header; -> (N, tensors, __metadata__).
    """
    return read_header_ranged(lambda offset, n: pread_exact(fd, n, offset, file_name), file_name, file_size)


def read_header_ranged(read: Callable[[int, int], bytes], file_name: str, file_size: int
                       ) -> tuple[int, dict[str, HeaderTensor], dict[str, str]]:
    """Read and validate a header through ``read(offset, n)``, which returns exactly ``n`` bytes
    at ``offset`` of a file (or object) of ``file_size`` bytes: a bounded ``pread``, a ranged GET.

    Asks for the 8-byte length, then exactly the declared header (checked against
    :data:`MAX_HEADER_BYTES` and the size first); -> (N, tensors, __metadata__).
    """
    if file_size < 8:
        raise _fail("The file is too short to hold a safetensors header length", file_name,
                    expected="at least 8 bytes", got=f"{file_size} bytes")
    header_len = int.from_bytes(read(0, 8), "little")
    if header_len > MAX_HEADER_BYTES:
        raise _fail("The declared header length is too large", file_name,
                    expected=f"at most {MAX_HEADER_BYTES} bytes", got=f"{header_len} bytes")
    if header_len > file_size - 8:
        raise _fail("The declared header length runs past the end of the file", file_name,
                    expected=f"at most {file_size - 8} bytes", got=f"{header_len} bytes")
    raw = read(8, header_len)
    tensors, metadata = parse_header_bytes(raw, file_name, data_size=file_size - 8 - header_len)
    return header_len, tensors, metadata


def open_regular(path: str, file_name: str) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking (FIFOs) and check it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        from weightcast.orchestrator.errors import CheckpointNotFoundError
        raise CheckpointNotFoundError("A checkpoint file does not exist", where=f"file {file_name!r}",
                                      expected=f"a file at {path}",
                                      fix="re-download the checkpoint or fix the index") from None
    except OSError as exc:
        raise StorageError(f"Cannot open a checkpoint file: {exc.strerror}", where=f"file {file_name!r}",
                           fix="check the path and permissions") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _fail("A checkpoint file is not a regular file", file_name, expected="a regular file",
                    got=f"mode {stat.filemode(st.st_mode)}", fix="point at the real weight files")
    return fd, st


def read_header_stat(path: str | os.PathLike, file_name: str
                     ) -> tuple[os.stat_result, int, dict[str, HeaderTensor], dict[str, str]]:
    """Like :func:`read_header`, also returning the ``os.fstat`` of the file that was parsed."""
    fd, st = open_regular(os.fspath(path), file_name)
    try:
        return (st, *read_header_fd(fd, file_name, st.st_size))
    finally:
        os.close(fd)


def read_header(path: str | os.PathLike, file_name: str
                ) -> tuple[int, dict[str, HeaderTensor], dict[str, str]]:
    """Read and validate the header of the safetensors file at ``path``.

    ``file_name`` is how messages name the file. -> (header length N, {name: HeaderTensor},
    __metadata__); the data region starts at ``8 + N``.
    """
    return read_header_stat(path, file_name)[1:]


def check_plain_name(name: Any, where: str) -> str:
    """Check an index file name is a plain relative path (no '..', '.', '', absolute, backslash)."""
    if type(name) is not str or not name:
        raise UnsafePathError("A weight file name is not a non-empty string", where=where,
                              got=repr(name)[:80], fix="fix the index's weight_map")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\0" in name or re.match(r"^[A-Za-z]:", name)
            or any(p in ("", ".", "..") for p in parts)):
        raise UnsafePathError("A weight file name is not a plain relative name inside the checkpoint",
                              where=where, expected="a name like 'model-00001-of-00002.safetensors'",
                              got=repr(name)[:200], fix="fix the index's weight_map")
    return name


def _index_metadata(meta: Any, index_name: str) -> dict[str, Any]:
    if meta is None:
        return {}
    if type(meta) is not dict:
        raise _fail("The index's metadata is not a JSON object", index_name, got=type(meta).__name__,
                    fix="fix or remove the index's metadata")
    total = meta.get("total_size")
    if total is not None:
        if type(total) is float and total.is_integer():
            meta["total_size"] = total = int(total)
        if type(total) is not int or total < 0:
            raise _fail("The index's metadata.total_size is not a non-negative integer", index_name,
                        got=repr(total)[:80], fix="fix or remove metadata.total_size")
    return meta


def validate_index_json(raw: bytes, index_name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Validate the bytes of a ``*.safetensors.index.json`` -> (weight_map, metadata).

    weight_map maps tensor names to plain relative file names; metadata is the index's
    ``metadata`` object (``{}`` when absent). Cross-checks against headers happen in
    :func:`weightcast.orchestrator.checkpoint.load_index`.
    """
    obj = _decode_json(raw, index_name, "index JSON", brace_first=False)
    if type(obj) is not dict:
        raise _fail("The index is not a JSON object", index_name, got=type(obj).__name__)
    weight_map = obj.get("weight_map")
    if type(weight_map) is not dict or not weight_map:
        raise _fail("The index has no weight_map (or it is empty)", index_name,
                    expected='a non-empty object "weight_map": {tensor: file}',
                    got=repr(weight_map)[:80], fix="re-save the checkpoint to rebuild its index")
    check_tensor_count(len(weight_map), index_name, "index")
    check_utf8_names(raw, [*weight_map, *weight_map.values()], index_name, "index")
    for tensor, file in weight_map.items():
        if type(file) is not str:
            raise _fail("A weight_map value is not a file name", index_name, tensor,
                        expected="a string", got=repr(file)[:80], fix="fix the index's weight_map")
    for file in set(weight_map.values()):
        check_plain_name(file, f"index {index_name!r}, weight_map")
    return weight_map, _index_metadata(obj.get("metadata"), index_name)
