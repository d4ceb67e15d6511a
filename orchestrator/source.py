"""Sources: a local path or a Hugging Face repo id -> a local directory of weight files.

:func:`resolve_source` is called by the rank that reads metadata (rank 0, or local rank 0 of
each node when storage is node-local) before :func:`weightcast.orchestrator.checkpoint.load_index`; the
other ranks wait at a barrier. Local paths win over repo ids. A repo id is resolved with
``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``, ``local_files_only``,
``token``; ``HF_HUB_OFFLINE`` is honoured by huggingface_hub itself), fetching only the
safetensors weights the index names, the index, ``config.json`` and ``generation_config.json``.

Pickle weights (``pytorch_model*.bin``, ``*.pt``) are refused unless ``allow_pickle=True``; the
workers then read them with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from weightcast.orchestrator.checkpoint import (allowed_dirs, find_hf_cache_root, find_pickle_files,
                                     locate_safetensors, read_weight_map, resolve_inside)
from weightcast.orchestrator.errors import (CheckpointNotFoundError, ConfigError, PickleRefusedError,
                                 WeightcastError)
from weightcast.orchestrator.safetensors_format import pread_exact, open_regular

SMALL_FILES = ("config.json", "generation_config.json")
INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", PICKLE_INDEX_NAME, "*.pt", "*.pth")
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
_MAX_CONFIG_BYTES = 10_000_000


@dataclass(frozen=True, slots=True)
class ResolvedSource:
    """Where a checkpoint's files are. ``weight_files`` are names relative to ``root``."""
    root: str  # absolute local directory
    weight_files: tuple[str, ...]
    kind: Literal["safetensors", "pickle"]
    config: dict | None  # parsed config.json, when present
    repo_id: str | None = None
    revision: str | None = None  # the commit hash, when from the hub or an HF cache snapshot
    cache_root: str | None = None  # the models--org--name folder of an HF cache


def config_dtype(config: dict | None) -> str | None:
    """The checkpoint dtype a config.json declares: ``"dtype"`` (transformers 5) or ``"torch_dtype"``.

    Falls back to ``text_config`` for multimodal configs; returns e.g. ``"bfloat16"`` or None.
    """
    if not config:
        return None
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            value = cfg.get("dtype") or cfg.get("torch_dtype")
            if isinstance(value, str):
                return value.removeprefix("torch.")
    return None


def read_config(root: str, name: str = "config.json", cache_root: str | None = None) -> dict | None:
    """Parse ``root/name`` as a JSON object; None when absent. Raises ConfigError when malformed
    and UnsafePathError when it links outside the checkpoint (or its HF cache root)."""
    path = os.path.join(root, name)
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(resolve_inside(root, name, allowed_dirs(root, cache_root), name))
    if not os.path.exists(real):
        raise ConfigError(f"{name} is a dangling symlink", where=path, got=real,
                          fix="re-download the checkpoint (e.g. `hf download REPO`)")
    fd, st = open_regular(real, name)
    try:
        check_config_size(name, path, st.st_size)
        raw = pread_exact(fd, st.st_size, 0, name)
    finally:
        os.close(fd)
    return parse_config(raw, name, path)


def check_config_size(name: str, where: str, size: int) -> None:
    """A config file larger than ``_MAX_CONFIG_BYTES`` is refused before it is read."""
    if size > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{name} is too large", where=where,
                          expected=f"at most {_MAX_CONFIG_BYTES} bytes", got=size)


def parse_config(raw: bytes, name: str, path: str) -> dict:
    """Parse the bytes of a config file as one JSON object (ConfigError otherwise)."""
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{name} is not valid JSON", where=path, got=str(exc)[:200],
                          fix="re-download or fix the config") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{name} is not a JSON object", where=path, expected="a JSON object {...}",
                          got=type(config).__name__, fix=f"re-download or fix {name}")
    return config


def _pickle_refused(where: str, files: tuple[str, ...]) -> PickleRefusedError:
    return PickleRefusedError(
        "The checkpoint has only pickle weights, which can run code when loaded", where=where,
        expected="*.safetensors weights", got=list(files[:5]),
        fix="convert it to safetensors, or pass allow_pickle=True to read it with "
            "torch.load(weights_only=True)")


def _pickle_files(root: str) -> tuple[str, ...]:
    if os.path.exists(os.path.join(root, PICKLE_INDEX_NAME)):
        weight_map, _ = read_weight_map(root, PICKLE_INDEX_NAME, allowed_dirs(root))
        return tuple(sorted(set(weight_map.values())))
    return find_pickle_files(root)


def _weights_in_dir(root: str, allow_pickle: bool) -> tuple[str, tuple[str, ...]] | None:
    """-> (kind, weight file names) of a directory; None when it holds no weights at all."""
    found = locate_safetensors(root)
    if found is not None:
        kind, name = found
        if kind == "single":
            return "safetensors", (name,)
        weight_map, _ = read_weight_map(root, name, allowed_dirs(root))
        return "safetensors", tuple(sorted(set(weight_map.values())))
    pickles = _pickle_files(root)
    if not pickles:
        return None
    if not allow_pickle:
        raise _pickle_refused(root, pickles)
    return "pickle", pickles


def _weights_of_file(path: str, allow_pickle: bool) -> tuple[str, tuple[str, ...]]:
    root, name = os.path.dirname(path), os.path.basename(path)
    if name.endswith(".index.json"):
        weight_map, _ = read_weight_map(root, name, allowed_dirs(root))
        files = tuple(sorted(set(weight_map.values())))
        kind = "safetensors" if all(f.endswith(".safetensors") for f in files) else "pickle"
    else:
        files, kind = (name,), ("safetensors" if name.endswith(".safetensors") else "pickle")
    if kind == "pickle" and not allow_pickle:
        raise _pickle_refused(path, files)
    return kind, files


def _snapshot_identity(root: str) -> tuple[str | None, str | None, str | None]:
    """(repo_id, commit, cache_root) when ``root`` is an HF cache snapshot dir, else Nones."""
    cache_root = find_hf_cache_root(root)
    if cache_root is None:
        return None, None, None
    repo_id = os.path.basename(cache_root).split("--", 1)[1].replace("--", "/")
    return repo_id, os.path.basename(root), cache_root


def _resolve_local(path: str, allow_pickle: bool) -> ResolvedSource:
    path = os.path.abspath(path)
    if os.path.isdir(path):
        root, found = path, _weights_in_dir(path, allow_pickle)
        if found is None:
            raise CheckpointNotFoundError(
                "The directory holds no weights", where=path,
                expected="model.safetensors, model.safetensors.index.json or *.safetensors",
                fix="point at a checkpoint directory (one written by save_pretrained)")
    else:
        root, found = os.path.dirname(path), _weights_of_file(path, allow_pickle)
    repo_id, revision, cache_root = _snapshot_identity(root)
    allowed = allowed_dirs(root, cache_root)
    for name in found[1]:  # weights (pickle ones too) must not link out of the checkpoint
        resolve_inside(root, name, allowed, name)
    return ResolvedSource(root=root, weight_files=found[1], kind=found[0],  # type: ignore[arg-type]
                          config=read_config(root, cache_root=cache_root), repo_id=repo_id, revision=revision,
                          cache_root=cache_root)


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~", ".")) or source.count("/") > 1
            or os.sep != "/" and os.sep in source or not _REPO_ID.match(source))


def resolve_source(source: str | os.PathLike, *, revision: str | None = None,
                   cache_dir: str | None = None, local_files_only: bool | None = None,
                   token: str | bool | None = None, allow_pickle: bool = False) -> ResolvedSource:
    """Resolve ``source`` (a local dir / file, or an HF repo id) to a :class:`ResolvedSource`.

    Not collective: one rank per storage domain calls it. A missing path, repo or revision
    raises CheckpointNotFoundError naming the fix; pickle-only weights raise PickleRefusedError
    unless ``allow_pickle``. ``local_files_only=None`` leaves the choice to huggingface_hub
    (``HF_HUB_OFFLINE``).
    """
    text = os.fspath(source)
    path = os.path.expanduser(text)
    if os.path.lexists(path):
        return _resolve_local(path, allow_pickle)
    if _looks_like_path(text):
        raise CheckpointNotFoundError(
            "The checkpoint path does not exist", where=text,
            fix="check the path, or pass a Hugging Face repo id such as 'org/name'")
    return _resolve_repo(text, revision=revision, cache_dir=cache_dir,
                         local_files_only=local_files_only, token=token, allow_pickle=allow_pickle)


# --------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------

def _hub_error(exc: Exception, repo_id: str, revision: str | None, cache_dir: str | None
               ) -> WeightcastError:
    from huggingface_hub import constants, errors
    where = f"repo {repo_id!r}, revision {revision or 'main'!r}"
    cache = cache_dir or constants.HF_HUB_CACHE
    if isinstance(exc, errors.GatedRepoError):
        fix = "accept the model's licence on huggingface.co and pass token= (or run `hf auth login`)"
    elif isinstance(exc, errors.RevisionNotFoundError):
        fix = "check the revision (a branch, tag or 40-hex commit of the repo)"
    elif isinstance(exc, errors.RepositoryNotFoundError):
        fix = "check the repo id; for a private repo pass token= (or run `hf auth login`)"
    elif isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        fix = (f"the repo/revision is not (fully) in the cache {cache}: download it once with network "
               f"access (HF_HUB_OFFLINE unset, `hf download {repo_id}`), or pass cache_dir= of a "
               "cache that holds it")
    else:
        fix = "check the repo id, the revision, the network and the token"
    return CheckpointNotFoundError("Cannot resolve the Hugging Face repo", where=where,
                                   got=f"{type(exc).__name__}: {str(exc)[:300].rstrip('.')}", fix=fix)


def _fnmatch_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], hub: dict[str, Any]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **hub)
    except HFValidationError as exc:
        raise CheckpointNotFoundError("Not a valid Hugging Face repo id", where=repo_id,
                                      got=str(exc)[:200], fix="pass an existing path or 'org/name'"
                                      ) from None
    except (OSError, ValueError) as exc:  # the hub's errors derive from these
        raise _hub_error(exc, repo_id, revision, hub.get("cache_dir")) from exc


def _remote_pickles(repo_id: str, commit: str, folder: str, hub: dict[str, Any]) -> tuple[str, ...]:
    """Pickle weight names of the repo: from the cached folder offline, else from the listing."""
    local = _pickle_files(folder)
    if local or hub.get("local_files_only"):
        return local
    from huggingface_hub import HfApi
    try:
        names = HfApi(token=hub.get("token")).list_repo_files(repo_id, revision=commit)
    except (OSError, ValueError):  # offline or unreachable: what the cache shows is all we know
        return local
    return tuple(n for n in names if "/" not in n and n.endswith((".bin", ".pt", ".pth")))


def _resolve_repo(repo_id: str, *, revision: str | None, cache_dir: str | None,
                  local_files_only: bool | None, token: str | bool | None,
                  allow_pickle: bool) -> ResolvedSource:
    """Two snapshot calls: the small files (pins the commit), then exactly the weights needed."""
    hub: dict[str, Any] = {"cache_dir": cache_dir, "token": token}
    if local_files_only is not None:
        hub["local_files_only"] = local_files_only
    folder = _snapshot(repo_id, revision, [INDEX_NAME, *SMALL_FILES], hub)
    commit = os.path.basename(folder)
    if os.path.exists(os.path.join(folder, INDEX_NAME)):
        weight_map, _ = read_weight_map(folder, INDEX_NAME, allowed_dirs(folder))
        patterns = [_fnmatch_escape(n) for n in sorted(set(weight_map.values()))]
    else:
        patterns = ["*.safetensors"]
    folder = _snapshot(repo_id, commit, patterns, hub)
    found = locate_safetensors(folder)
    if found is None:
        pickles = _remote_pickles(repo_id, commit, folder, hub)
        if not pickles:
            raise CheckpointNotFoundError(
                "The repo has no weights (no *.safetensors, no pickle)", where=f"repo {repo_id!r}",
                fix="check the repo id and revision; weights in subfolders are not supported")
        if not allow_pickle:
            raise _pickle_refused(f"repo {repo_id!r}", pickles)
        folder = _snapshot(repo_id, commit, list(PICKLE_PATTERNS), hub)
    resolved = _resolve_local(folder, allow_pickle)
    return ResolvedSource(root=resolved.root, weight_files=resolved.weight_files,
                          kind=resolved.kind, config=resolved.config, repo_id=repo_id,
                          revision=commit, cache_root=find_hf_cache_root(folder))
