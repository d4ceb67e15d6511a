"""CheckpointIndex: every tensor of a checkpoint -> (file, dtype, shape, absolute byte range).

Built by :func:`load_index` from a local directory, a single ``.safetensors`` file or an HF cache
snapshot. Only metadata is read (the 8-byte length and the JSON header of each shard, the index
JSON); every field is validated by :mod:`weightcast.orchestrator.safetensors_format`.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from weightcast.orchestrator.errors import (CheckpointFormatError, CheckpointNotFoundError,
                                 PickleRefusedError, UnsafePathError)
from weightcast.orchestrator.safetensors_format import (MAX_INDEX_BYTES, HeaderTensor, open_regular, pread_exact,
                                             read_header_stat, validate_index_json)


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
    """One shard file: size and mtime (an object's ETag) are recorded so a file changed after
    planning is caught."""
    name: str
    size: int
    mtime_ns: int
    data_start: int  # 8 + header length
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    etag: str | None = None  # object storage: the object's ETag when its header was read


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


# --------------------------------------------------------------------------------------------
# Building an index from disk
# --------------------------------------------------------------------------------------------

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickles the Trainer writes beside the weights: never weights themselves.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt",
               "scheduler.bin", "scaler.pt", "rng_state")


def find_hf_cache_root(root: str) -> str | None:
    """The ``models--org--name`` folder holding ``root`` when it is an HF snapshot dir, else None.

    A snapshot is ``<cache>/models--org--name/snapshots/<commit>``; its files are symlinks into
    ``../../blobs``, which :func:`load_index` must accept.
    """
    root = os.path.abspath(root)
    snapshots = os.path.dirname(root)
    repo_dir = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and re.match(
            r"^(models|datasets|spaces)--.+", os.path.basename(repo_dir)):
        return repo_dir
    return None


def locate_safetensors(directory: str) -> tuple[str, str] | None:
    """Which safetensors weights a directory holds: ``("index", name)``, ``("single", name)`` or None.

    Order (as transformers): ``model.safetensors``, ``model.safetensors.index.json``, the one
    ``*.safetensors.index.json``, the one ``*.safetensors``. Several candidates without an index
    raise CheckpointFormatError. Called by :func:`load_index` and ``weightcast.orchestrator.source``.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise CheckpointNotFoundError(f"Cannot list the checkpoint directory: {exc.strerror}",
                                      where=directory, fix="check the path and permissions") from exc
    return pick_safetensors(names, directory)


def pick_safetensors(names: list[str], directory: str) -> tuple[str, str] | None:
    """:func:`locate_safetensors` on a listing (file names of one directory or object prefix)."""
    names = sorted(names)
    if SINGLE_FILE_NAME in names:
        return "single", SINGLE_FILE_NAME
    if INDEX_FILE_NAME in names:
        return "index", INDEX_FILE_NAME
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    singles = [n for n in names if n.endswith(".safetensors")]
    for kind, found in (("index", indexes), ("single", singles)):
        if len(found) == 1:
            return kind, found[0]
        if len(found) > 1:
            raise CheckpointFormatError(
                f"The directory holds several {'index files' if kind == 'index' else 'safetensors files'}"
                " and no model.safetensors.index.json", where=directory,
                expected="one model.safetensors, or an index naming the shards", got=found[:10],
                fix="add a model.safetensors.index.json, or pass the path of one .safetensors file")
    return None


def find_pickle_files(directory: str) -> tuple[str, ...]:
    """Names of pickle weight files (``*.bin``, ``*.pt``, ...) directly inside ``directory``."""
    try:
        return tuple(sorted(n for n in os.listdir(directory)
                            if n.endswith(PICKLE_SUFFIXES) and not n.startswith(NOT_WEIGHTS)))
    except OSError:
        return ()


def resolve_inside(root: str, name: str, allowed: tuple[str, ...], where: str) -> str:
    """Absolute real path of ``root/name``; it must lie inside one of the ``allowed`` real dirs.

    Symlinks are followed (HF snapshots link into ``../../blobs``); a target outside every
    allowed directory raises UnsafePathError. ``root`` itself must be allowed (as
    :func:`allowed_dirs` makes it).
    """
    full = os.path.join(root, name)
    if "/" not in name:  # fast path: a plain entry of root that is not a link is inside root
        try:
            if not stat.S_ISLNK(os.lstat(full).st_mode):
                return full
        except OSError:
            pass  # missing: resolved below, then reported by whoever opens it
    real = os.path.realpath(full)
    if not any(real == a or real.startswith(a.rstrip(os.sep) + os.sep) for a in allowed):
        raise UnsafePathError("A checkpoint file resolves outside the checkpoint directory",
                              where=where, expected=f"a path inside {' or '.join(allowed)}",
                              got=f"{full} -> {real}",
                              fix="copy the file into the checkpoint directory instead of linking it")
    return real


def _file_entries(root: str, name: str, allowed: tuple[str, ...]
                  ) -> tuple[FileEntry, dict[str, HeaderTensor]]:
    real = resolve_inside(root, name, allowed, f"file {name!r}")
    st, header_len, tensors, meta = read_header_stat(real, name)
    entry = FileEntry(name=name, size=st.st_size, mtime_ns=st.st_mtime_ns,
                      data_start=8 + header_len, metadata=MappingProxyType(dict(meta)))
    return entry, tensors


def allowed_dirs(root: str, cache_root: str | None = None) -> tuple[str, ...]:
    """Real paths checkpoint files may resolve into: ``root`` and its HF cache root, if any."""
    cache_root = cache_root or find_hf_cache_root(root)
    return tuple(dict.fromkeys(os.path.realpath(d) for d in (root, cache_root) if d))


def read_weight_map(root: str, name: str, allowed: tuple[str, ...]) -> tuple[dict[str, str], dict]:
    """Read and validate the index ``root/name`` -> (weight_map, metadata); see allowed_dirs."""
    real = resolve_inside(root, name, allowed, f"index {name!r}")
    fd, st = open_regular(real, name)
    try:
        if st.st_size > MAX_INDEX_BYTES:
            raise CheckpointFormatError("The index file is too large", where=f"index {name!r}",
                                        expected=f"at most {MAX_INDEX_BYTES} bytes",
                                        got=f"{st.st_size} bytes")
        raw = pread_exact(fd, st.st_size, 0, name)
    finally:
        os.close(fd)
    return validate_index_json(raw, name)


def _cross_check(index_name: str, weight_map: dict[str, str],
                 headers: dict[str, dict[str, HeaderTensor]]) -> None:
    """Every header tensor listed in the index under its own file, once; every listed one found."""
    seen: dict[str, str] = {}
    for file, tensors in headers.items():
        for tname in tensors:
            if tname in seen:
                raise CheckpointFormatError(
                    "A tensor is stored in two files", where=f"tensor {tname!r}",
                    got=f"files {seen[tname]!r} and {file!r}",
                    fix="remove the duplicate from one shard and re-save the checkpoint")
            seen[tname] = file
    for tname, file in seen.items():
        listed = weight_map.get(tname)
        if listed != file:
            got = "not listed" if listed is None else f"listed under {listed!r}"
            raise CheckpointFormatError(
                "A tensor in a shard's header does not match the index",
                where=f"file {file!r}, tensor {tname!r}, index {index_name!r}",
                expected=f"weight_map[{tname!r}] == {file!r}", got=got,
                fix="re-save the checkpoint to rebuild its index")
    for tname, file in weight_map.items():
        if tname not in seen:
            raise CheckpointFormatError(
                "A tensor listed in the index is missing from its shard",
                where=f"file {file!r}, tensor {tname!r}, index {index_name!r}",
                expected=f"tensor {tname!r} in the header of {file!r}", got="absent",
                fix="re-download the shard or re-save the checkpoint")


def _check_total_size(index_name: str, metadata: dict, total: int) -> None:
    """A ``metadata.total_size`` that differs from the shards' headers is only a warning: it is
    informational (from_pretrained loads such checkpoints), the headers are what is read."""
    declared = metadata.get("total_size")
    if declared is not None and declared != total:
        import warnings
        warnings.warn(f"The index {index_name!r} declares metadata.total_size={declared}, the shards' headers "
                      f"hold {total} bytes of tensors; loading by the headers", stacklevel=3)


def _build(root: str, files: list[FileEntry], headers: dict[str, dict[str, HeaderTensor]],
           metadata: Mapping[str, object]) -> CheckpointIndex:
    starts = {f.name: f.data_start for f in files}
    tensors = [TensorEntry(name=n, file=file, dtype=t.dtype, shape=t.shape,
                           offset=starts[file] + t.begin, length=t.end - t.begin)
               for file, tmap in headers.items() for n, t in tmap.items()]
    tensors.sort(key=lambda t: (t.file, t.offset, t.name))
    files.sort(key=lambda f: f.name)
    return CheckpointIndex(root=root, files=tuple(files), tensors=tuple(tensors),
                           metadata=MappingProxyType(dict(metadata)))


def _locate_path(path: str) -> tuple[str, str, str]:
    """-> (root dir, mode "index"|"single", name) for a directory or a file path."""
    if os.path.isdir(path):
        found = locate_safetensors(path)
        if found is None:
            pickles = find_pickle_files(path)
            if pickles:
                raise PickleRefusedError(
                    "The checkpoint holds only pickle weights", where=path, expected="*.safetensors",
                    got=list(pickles[:5]),
                    fix="convert it to safetensors, or load it with allow_pickle=True "
                        "(read with torch.load(weights_only=True))")
            raise CheckpointNotFoundError("No safetensors weights in the directory", where=path,
                                          expected="model.safetensors or model.safetensors.index.json",
                                          fix="point at a checkpoint directory or a .safetensors file")
        return path, found[0], found[1]
    if os.path.exists(path) or os.path.islink(path):
        name = os.path.basename(path)
        return os.path.dirname(path), ("index" if name.endswith(".index.json") else "single"), name
    raise CheckpointNotFoundError("The checkpoint path does not exist", where=path,
                                  fix="check the path, or pass a Hugging Face repo id to resolve_source")


def load_index(path: str | os.PathLike, *, cache_root: str | None = None) -> CheckpointIndex:
    """Read and validate a checkpoint's metadata -> :class:`CheckpointIndex`.

    ``path`` is a directory (``model.safetensors.index.json``, a single ``model.safetensors`` or
    exactly one ``*.safetensors``), a ``.safetensors`` / index file path, or an HF snapshot dir.
    Files may be symlinks resolving inside the checkpoint dir or its HF cache root
    (``models--*``, found from ``path`` or given as ``cache_root``). Reads only the index and
    the headers. Called once, by the rank that plans (rank 0); not collective.
    """
    root, mode, name = _locate_path(os.path.abspath(os.fspath(path)))
    allowed = allowed_dirs(root, cache_root)
    in_cache = bool(cache_root or find_hf_cache_root(root))
    if mode == "single":
        if in_cache:
            _check_cache_file(root, [name])
        entry, tensors = _file_entries(root, name, allowed)
        return _build(root, [entry], {name: tensors}, {})
    if in_cache:
        _check_cache_file(root, [name])
    weight_map, metadata = read_weight_map(root, name, allowed)
    if in_cache:  # a broken cache names the file and `weightcast cache verify`, never a parse error
        _check_cache_file(root, sorted(set(weight_map.values())))
    files: list[FileEntry] = []
    headers: dict[str, dict[str, HeaderTensor]] = {}
    for file in sorted(set(weight_map.values())):
        entry, headers[file] = _file_entries(root, file, allowed)
        files.append(entry)
    return index_from_headers(root, name, weight_map, metadata, files, headers)


def index_from_headers(root: str, index_name: str | None, weight_map: dict[str, str] | None,
                       metadata: Mapping[str, object], files: list[FileEntry],
                       headers: dict[str, dict[str, HeaderTensor]]) -> CheckpointIndex:
    """Cross-check parsed headers against their index (when ``index_name``) -> the index.

    Shared by :func:`load_index` and object-storage sources; pure."""
    if index_name is not None and weight_map is not None:
        _cross_check(index_name, weight_map, headers)
        _check_total_size(index_name, dict(metadata),
                          sum(t.end - t.begin for h in headers.values() for t in h.values()))
    return _build(root, files, headers, metadata)


def _check_cache_file(root: str, names: list[str]) -> None:
    from weightcast.orchestrator.cache_doctor import check_snapshot_files
    check_snapshot_files(root, names)
