"""safetensors dtype codes: bits per element, byte sizes, torch dtypes, and the dtypes a load refuses.

:data:`DTYPE_BITS` holds the codes the installed safetensors accepts (newer sub-byte and float8
codes only where it knows them). Used by the header parser
(:mod:`weightcast.orchestrator.safetensors_format`, which re-exports these names), the planner and
workers. Pure: no file access; :func:`torch_dtype` imports torch.
"""
from __future__ import annotations

import re

from weightcast.orchestrator.errors import CheckpointFormatError

_BASE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
}
# Codes only newer safetensors releases know; kept when the installed one accepts them.
_NEWER_BITS: dict[str, int] = {
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "C64": 64,
}
# torch dtypes that safetensors.torch._TYPES may not list (attribute names on the torch module).
_EXTRA_TORCH = {"F8_E8M0": "float8_e8m0fnu", "C64": "complex64", "F8_E4M3FNUZ": "float8_e4m3fnuz",
                "F8_E5M2FNUZ": "float8_e5m2fnuz", "U16": "uint16", "U32": "uint32", "U64": "uint64"}


def _installed_dtype_codes() -> frozenset[str] | None:
    """The dtype codes the installed safetensors accepts, read from its own error message.

    Probes ``safetensors.deserialize`` with an unknown code once (about a millisecond); returns
    None when safetensors is missing or its message has another form.
    """
    try:
        import safetensors
        header = b'{"t":{"dtype":"??","shape":[0],"data_offsets":[0,0]}}'
        safetensors.deserialize(len(header).to_bytes(8, "little") + header)
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - the message is what we read
        found = re.search(r"expected one of (.*?)(?: at line|$)", str(exc))
        if found:
            return frozenset(re.findall(r"`([A-Z0-9_]+)`", found.group(1)))
    return None


def _build_dtype_bits() -> dict[str, int]:
    known = _installed_dtype_codes()
    bits = dict(_BASE_BITS)
    if known is not None:
        bits.update({code: n for code, n in _NEWER_BITS.items() if code in known})
    return bits


DTYPE_BITS: dict[str, int] = _build_dtype_bits()
"""safetensors dtype code -> bits per element (F4 = 4, F6_* = 6 when safetensors knows them)."""


def dtype_itemsize_bytes(code: str) -> int:
    """Bytes per element of a safetensors dtype code.

    Raises CheckpointFormatError for unknown codes and for sub-byte dtypes (F4, F6_*), whose
    sizes only make sense per tensor: use :func:`tensor_nbytes` for those.
    """
    bits = DTYPE_BITS.get(code)
    if bits is None:
        raise CheckpointFormatError(f"Unknown safetensors dtype {code!r}",
                                    expected=f"one of {sorted(DTYPE_BITS)}", got=repr(code))
    if bits % 8:
        raise CheckpointFormatError(
            f"dtype {code} has {bits} bits per element, not a whole number of bytes",
            fix="use tensor_nbytes(code, shape) for sub-byte dtypes")
    return bits // 8


def tensor_nbytes(code: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor of ``shape`` in dtype ``code`` (sub-byte dtypes must fill whole bytes)."""
    bits = DTYPE_BITS.get(code)
    if bits is None:
        raise CheckpointFormatError(f"Unknown safetensors dtype {code!r}",
                                    expected=f"one of {sorted(DTYPE_BITS)}", got=repr(code))
    numel = 1
    for dim in shape:
        numel *= dim
    total = numel * bits
    if total % 8:
        raise CheckpointFormatError(f"A {code} tensor of shape {list(shape)} is not whole bytes",
                                    got=f"{total} bits")
    return total // 8


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code (imports torch; workers call it).

    Uses ``safetensors.torch._TYPES`` where available, then torch attributes for codes that
    table lacks. Raises CheckpointFormatError when torch has no such dtype.
    """
    import torch
    try:
        from safetensors.torch import _TYPES as table
    except ImportError:  # pragma: no cover - safetensors without its torch module
        table = {}
    found = table.get(code)
    if found is None and code in _EXTRA_TORCH:
        found = getattr(torch, _EXTRA_TORCH[code], None)
    if found is None:
        raise CheckpointFormatError(
            f"safetensors dtype {code} has no torch equivalent in torch {torch.__version__}",
            expected=f"one of {sorted(table)}", got=code,
            fix="upgrade torch and safetensors, or convert the checkpoint to a supported dtype")
    return found


def check_loadable_dtypes(tensors) -> None:
    """Refuse, before any byte is read, tensors of sub-byte dtypes (``F4``: float4 e2m1, two per
    byte; ``F6_*``). safetensors parses them and torch has ``float4_e2m1fn_x2``, but a tensor of
    that dtype has half the last dimension its header declares, and the loader's views, slices and
    shards are made per header element. ``tensors`` holds objects with ``name`` and ``dtype``."""
    for t in tensors:
        bits = DTYPE_BITS.get(t.dtype)
        if bits is not None and bits % 8:
            raise CheckpointFormatError(
                f"Tensors of the sub-byte dtype {t.dtype} ({bits} bits per element) are not loaded",
                where=f"tensor {t.name!r}", expected="dtypes of whole bytes (F32, BF16, F16, F8_*, integers...)",
                got=t.dtype, fix="load this checkpoint with safetensors.torch.load_file or from_pretrained "
                "(F4 becomes torch.float4_e2m1fn_x2 there), or store it in a byte-sized dtype")
