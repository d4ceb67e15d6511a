"""Checkpoints in object storage: ``s3://bucket/prefix`` (a "directory": ``model.safetensors``
or an index, plus ``config.json`` and other small files) and ``s3://bucket/key.safetensors``.

Pure: the object-store client is behind :class:`ObjectStore` (``weightcast.workers.s3`` has the
boto3 one), so planning logic and the strict parser stay shared with local files. Headers are
read with ranged GETs through :func:`~weightcast.orchestrator.safetensors_format.read_header_ranged`
(a first request of at most :data:`HEADER_FIRST_BYTES`, a second one only for a longer header),
under the same limits. Every object's size and ETag go into the index's :class:`FileEntry`, so a
read of a replaced object fails instead of mixing versions. Called by the rank that plans.
"""
from __future__ import annotations

import re
from types import MappingProxyType
from dataclasses import dataclass
from typing import Protocol

from weightcast.orchestrator.checkpoint import (INDEX_SUFFIX, CheckpointIndex, FileEntry,
                                                index_from_headers, pick_safetensors)
from weightcast.orchestrator.errors import (CheckpointFormatError, CheckpointNotFoundError, ConfigError,
                                            PickleRefusedError)
from weightcast.orchestrator.safetensors_format import (MAX_INDEX_BYTES, HeaderTensor, check_plain_name,
                                                        read_header_ranged, validate_index_json)
from weightcast.orchestrator.source import ResolvedSource, check_config_size, parse_config

SCHEMES = ("s3://",)
HEADER_FIRST_BYTES = 64 << 10
"""The first ranged GET of a header: most headers fit; a longer one costs one more request."""
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")


@dataclass(frozen=True, slots=True)
class ObjectUrl:
    """``s3://bucket/key``; ``key`` may be empty (the bucket's root) or a prefix."""
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> str:
        """The key of ``name`` inside this prefix."""
        return f"{self.key.rstrip('/')}/{name}" if self.key.strip("/") else name


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class ObjectStore(Protocol):
    """What planning needs from an object store (one bucket). Errors are WeightcastErrors:
    CheckpointNotFoundError for a missing bucket / key, StorageError for the rest."""

    bucket: str

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects directly under ``prefix`` (a key ending in ``/``, or ``""``), not recursive."""
        ...

    def head(self, key: str) -> ObjectInfo: ...

    def read(self, key: str, offset: int, length: int, etag: str | None) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of an object whose ETag must be ``etag``."""
        ...


def is_object_url(source: object) -> bool:
    """True for a source string naming object storage (``s3://...``)."""
    return isinstance(source, str) and source.lower().startswith(SCHEMES)


def parse_object_url(text: str) -> ObjectUrl:
    """``s3://bucket[/key]`` -> :class:`ObjectUrl`; a bad bucket name is a ConfigError."""
    if not is_object_url(text):
        raise ConfigError("Not an object-storage URL", got=repr(text)[:200], expected="s3://bucket/prefix")
    rest = text.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket or ""):
        raise ConfigError("The S3 URL has no valid bucket name", where=text,
                          expected="s3://bucket/prefix with a bucket of 3-255 lower-case letters, digits, "
                                   "'.', '-', '_'", got=repr(bucket), fix="check the URL")
    if "\0" in key or any(p in (".", "..") for p in key.split("/")):
        raise ConfigError("The S3 key has '.' or '..' parts", where=text, fix="use a plain key")
    return ObjectUrl(bucket, key)


def _is_file_key(key: str) -> bool:
    return key.endswith(".safetensors") or key.endswith(INDEX_SUFFIX)


@dataclass(frozen=True, slots=True)
class ObjectCheckpoint:
    """A resolved object-storage checkpoint: ``source.root`` is the prefix URL, ``objects``
    every object directly under it by name (weights, index, small files), ``index_name`` the
    index the weights were found through (None for one ``.safetensors`` object)."""
    source: ResolvedSource
    objects: dict[str, ObjectInfo]
    index_name: str | None


def resolve_object_source(store: ObjectStore, url: ObjectUrl) -> ObjectCheckpoint:
    """Rank 0: which weight objects ``url`` names, and config.json when present. Not collective."""
    if _is_file_key(url.key):
        prefix_key, _, name = url.key.rpartition("/")
        prefix = ObjectUrl(url.bucket, prefix_key)
        objects = {name: store.head(url.key)}
        objects.update({k: v for k, v in _listing(store, prefix).items() if k not in objects})
        found = ("index" if name.endswith(INDEX_SUFFIX) else "single", name)
    else:
        prefix = ObjectUrl(url.bucket, url.key.rstrip("/"))
        objects = _listing(store, prefix)
        found = pick_safetensors(list(objects), str(prefix))
        if found is None:
            _no_weights(prefix, list(objects))
    files: tuple[str, ...] = (found[1],)
    if found[0] == "index":
        weight_map, _ = validate_index_json(_read_whole(store, prefix, objects[found[1]], MAX_INDEX_BYTES), found[1])
        files = tuple(sorted(set(weight_map.values())))
    config = None
    if "config.json" in objects:
        info = objects["config.json"]
        check_config_size("config.json", f"{prefix}/config.json", info.size)
        config = parse_config(store.read(info.key, 0, info.size, info.etag), "config.json",
                              f"{prefix}/config.json")
    src = ResolvedSource(root=str(prefix), weight_files=files, kind="safetensors", config=config)
    return ObjectCheckpoint(src, objects, found[1] if found[0] == "index" else None)


def _listing(store: ObjectStore, prefix: ObjectUrl) -> dict[str, ObjectInfo]:
    base = prefix.key.rstrip("/")
    found = store.list(f"{base}/" if base else "")
    return {o.key[len(base) + 1 if base else 0:]: o for o in found}


def _no_weights(prefix: ObjectUrl, names: list[str]) -> None:
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    if pickles:
        raise PickleRefusedError("The object prefix holds only pickle weights", where=str(prefix),
                                 expected="*.safetensors", got=sorted(pickles)[:5],
                                 fix="convert the checkpoint to safetensors: pickle weights are not read "
                                     "from object storage")
    raise CheckpointNotFoundError("No safetensors weights under the S3 prefix", where=str(prefix),
                                  expected="model.safetensors or model.safetensors.index.json",
                                  got=sorted(names)[:10] or "no objects",
                                  fix="check the bucket and prefix (s3://bucket/prefix), or name one "
                                      ".safetensors object")


def _read_whole(store: ObjectStore, prefix: ObjectUrl, info: ObjectInfo, limit: int) -> bytes:
    if info.size > limit:
        raise CheckpointFormatError("The index object is too large", where=f"{prefix}/{info.key}",
                                    expected=f"at most {limit} bytes", got=f"{info.size} bytes")
    return store.read(info.key, 0, info.size, info.etag)


class _HeaderRanges:
    """``read(offset, n)`` for :func:`read_header_ranged`: a first GET of the object's first
    :data:`HEADER_FIRST_BYTES`, served from memory; anything past it is a second GET."""

    def __init__(self, store: ObjectStore, info: ObjectInfo) -> None:
        self.store, self.info = store, info
        self.first = store.read(info.key, 0, min(info.size, HEADER_FIRST_BYTES), info.etag)
        self.requests = 1

    def __call__(self, offset: int, n: int) -> bytes:
        if offset + n <= len(self.first):
            return self.first[offset:offset + n]
        self.requests += 1
        head = self.first[offset:]
        return head + self.store.read(self.info.key, offset + len(head), n - len(head), self.info.etag)


def load_object_index(store: ObjectStore, ckpt: ObjectCheckpoint) -> CheckpointIndex:
    """Rank 0: parse the index and every weight object's header -> :class:`CheckpointIndex`
    whose files carry size and ETag; ``root`` stays the prefix URL. Not collective."""
    src, objects = ckpt.source, ckpt.objects
    prefix = parse_object_url(src.root)
    weight_map, metadata = None, {}
    if ckpt.index_name is not None:
        raw = _read_whole(store, prefix, objects[ckpt.index_name], MAX_INDEX_BYTES)
        weight_map, metadata = validate_index_json(raw, ckpt.index_name)
    files: list[FileEntry] = []
    headers: dict[str, dict[str, HeaderTensor]] = {}
    for name in src.weight_files:
        check_plain_name(name, f"object {prefix}")
        info = objects.get(name)
        if info is None:
            raise CheckpointNotFoundError("A weight object named by the index does not exist",
                                          where=f"{prefix}/{name}", fix="upload the missing shard, or fix the index")
        header_len, headers[name], meta = read_header_ranged(_HeaderRanges(store, info), name, info.size)
        files.append(FileEntry(name=name, size=info.size, mtime_ns=0, data_start=8 + header_len,
                               metadata=MappingProxyType(dict(meta)), etag=info.etag))
    return index_from_headers(src.root, ckpt.index_name, weight_map, metadata, files, headers)
