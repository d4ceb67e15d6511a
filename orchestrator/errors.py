"""The weightcast error hierarchy.

Every error is a :class:`WeightcastError` and also derives from the builtin that fits, so callers
can catch ``ValueError`` / ``FileNotFoundError`` / ``PermissionError`` as they already do.
Messages say what went wrong, where (file, tensor, rank), what was expected, what was found and
how to fix it; :func:`describe` builds such a message.
"""
from __future__ import annotations


def describe(what: str, *, where: str | None = None, expected: object = None,
             got: object = None, fix: str | None = None) -> str:
    """Build a one-paragraph error message from its parts (empty parts are left out)."""
    parts = [what.rstrip(".") + "."]
    if where:
        parts.append(f"Where: {where}.")
    if expected is not None:
        parts.append(f"Expected: {expected}.")
    if got is not None:
        parts.append(f"Got: {got}.")
    if fix:
        parts.append(f"Fix: {fix.rstrip('.')}.")
    return " ".join(parts)


class WeightcastError(Exception):
    """Base class of every error raised by weightcast."""

    def __init__(self, what: str, *, where: str | None = None, expected: object = None,
                 got: object = None, fix: str | None = None) -> None:
        super().__init__(describe(what, where=where, expected=expected, got=got, fix=fix))
        self.where = where

    def __reduce__(self):  # errors travel between ranks as (class, message)
        return (_rebuild, (type(self), str(self), self.where))


def _rebuild(cls: type, message: str, where: str | None) -> "WeightcastError":
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.where = where
    return err


class CheckpointFormatError(WeightcastError, ValueError):
    """A safetensors file or index is malformed or inconsistent."""


class CheckpointNotFoundError(WeightcastError, FileNotFoundError):
    """The source (path, repo, file, revision) cannot be found."""


class UnsafePathError(WeightcastError, PermissionError):
    """A name in the checkpoint points outside the checkpoint directory."""


class PickleRefusedError(WeightcastError, PermissionError):
    """Only pickle weights exist and ``allow_pickle`` was not given."""


class RemoteCodeRefusedError(WeightcastError, PermissionError):
    """The config asks for remote code and ``trust_remote_code`` was not given."""


class ConfigError(WeightcastError, ValueError):
    """A cluster spec, device map, option or config.json is invalid."""


class DeviceMapError(ConfigError):
    """A device map does not cover the checkpoint or does not fit the cluster."""


class PlanError(WeightcastError, ValueError):
    """A load plan cannot be built or is inconsistent with the files on disk."""


class CacheError(WeightcastError, OSError):
    """A Hugging Face cache is broken (dangling link, link turned into text, bad ref...)."""


class ModelMismatchError(WeightcastError, ValueError):
    """The checkpoint does not match the model (missing / unexpected keys, shapes, dtypes)."""


class StorageError(WeightcastError, OSError):
    """Reading the checkpoint failed (I/O error, short read, file changed during the load)."""


class LoadError(WeightcastError, RuntimeError):
    """A distributed load failed on some rank; raised on every rank, naming the failing one."""

    @classmethod
    def from_message(cls, type_name: str, message: str) -> "WeightcastError":
        """Rebuild an error another process reported as (class name, message)."""
        target = next((c for c in _all_subclasses(WeightcastError) if c.__name__ == type_name), cls)
        return _rebuild(target, message, None)


def _all_subclasses(base: type) -> list[type]:
    out = []
    for sub in base.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out
