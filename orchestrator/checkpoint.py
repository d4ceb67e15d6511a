"""CheckpointIndex: every tensor of a checkpoint -> (file, dtype, shape, absolute byte range).

Built by :func:`load_index` from a local directory, a single ``.safetensors`` file or an HF cache
snapshot. Only metadata is read (the 8-byte length and the JSON header of each shard, the index
JSON); every field is validated by :mod:`orchestrator.safetensors_format`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor: ``offset`` is absolute in ``file`` (header included), ``length`` in bytes."""
    name: str
    file: str  # plain file name relative to the checkpoint root
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One shard file: size and mtime are recorded so a file changed after planning is caught."""
    name: str
    size: int
    mtime_ns: int
    data_start: int  # 8 + header length
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class CheckpointIndex:
    """A validated, frozen view of a safetensors checkpoint's metadata."""
    root: str  # absolute directory holding the files
    files: tuple[FileEntry, ...]  # sorted by name
    tensors: tuple[TensorEntry, ...]  # sorted by (file, offset)
    metadata: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    _by_name: Mapping[str, TensorEntry] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", MappingProxyType({t.name: t for t in self.tensors}))

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (headers excluded)."""
        return sum(t.length for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def tensor(self, name: str) -> TensorEntry:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)
