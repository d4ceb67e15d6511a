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


FIELDS = ("what", "where", "expected", "got", "fix", "rank", "host", "phase", "cause")


class WeightcastError(Exception):
    """Base class of every error raised by weightcast.

    Besides the message, the parts are attributes, as huggingface_hub's errors keep theirs:
    ``what``, ``where``, ``expected``, ``got``, ``fix``; and, for a distributed load, ``rank``,
    ``host`` and ``phase`` of the rank that failed, and ``cause``: the class name of the original
    error when it was raised on another rank (None when it was raised here).
    """
    what: str = ""
    where: str | None = None
    expected: object = None
    got: object = None
    fix: str | None = None
    rank: int | None = None
    host: str | None = None
    phase: str | None = None
    cause: str | None = None

    def __init__(self, what: str, *, where: str | None = None, expected: object = None, got: object = None,
                 fix: str | None = None, rank: int | None = None, host: str | None = None,
                 phase: str | None = None, cause: str | None = None) -> None:
        super().__init__(describe(what, where=where, expected=expected, got=got, fix=fix))
        self.what, self.where, self.expected, self.got, self.fix = what, where, expected, got, fix
        self.rank, self.host, self.phase, self.cause = rank, host, phase, cause

    def fields(self) -> dict[str, object]:
        """The structured parts, ``{name: value}`` for every name in :data:`FIELDS`."""
        return {name: getattr(self, name) for name in FIELDS}

    def __reduce__(self):  # errors travel between ranks as (class, message, fields)
        original = getattr(type(self), "_original", None)
        if original is not None:
            return (_rebuild_peer, (original, str(self), _plain(self.fields())))
        return (_rebuild, (type(self), str(self), _plain(self.fields())))


def _plain(fields: dict[str, object]) -> dict[str, object]:
    """Fields safe to pickle anywhere: expected/got as text unless they are plain values."""
    plain = (str, int, float, bool, type(None))
    return {k: v if isinstance(v, plain) else str(v) for k, v in fields.items()}


def _rebuild(cls: type, message: str, fields: dict | str | None = None) -> "WeightcastError":
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    if isinstance(fields, dict):
        for name, value in fields.items():
            setattr(err, name, value)
    else:  # an older (class, message, where) reduction
        err.where = fields
    return err


def _rebuild_peer(original: type, message: str, fields: dict) -> "WeightcastError":
    return _rebuild(peer_class(original), message, fields)


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
    """A distributed load failed on some rank; raised on every rank, naming the failing one.

    When the failing rank raised a WeightcastError, every rank raises that error's class
    instead, made a subclass of LoadError too (:func:`peer_error`), so both ``except
    ModelMismatchError`` and ``except LoadError`` catch it."""

    @classmethod
    def from_message(cls, type_name: str, message: str) -> "WeightcastError":
        """Rebuild an error another process reported as (class name, message)."""
        target = next((c for c in _all_subclasses(WeightcastError) if c.__name__ == type_name
                       and not hasattr(c, "_original")), cls)
        return _rebuild(target, message, None)


_PEER_CLASSES: dict[type, type] = {}


def peer_class(original: type) -> type:
    """The class every rank raises when ``original`` (a WeightcastError class) was raised on
    one rank of a load: a subclass of both ``original`` and :class:`LoadError`, with the
    original's name. A LoadError class is its own peer class."""
    if issubclass(original, LoadError):
        return original
    cls = _PEER_CLASSES.get(original)
    if cls is None:
        doc = f"{original.__name__} raised on one rank of a load, raised on every rank (also a LoadError)."
        cls = type(original.__name__, (original, LoadError), {"__module__": __name__, "__doc__": doc,
                                                              "__qualname__": original.__name__,
                                                              "_original": original})
        _PEER_CLASSES[original] = cls
    return cls


def peer_error(error: WeightcastError, *, rank: int, host: str, phase: str, others: str = "") -> WeightcastError:
    """``error`` (raised on ``rank``, on ``host``, during ``phase``) as every rank raises it: its
    class (:func:`peer_class`), its fields, the failing rank, host and phase, and ``cause`` the
    original class name; the message says where it failed (``others``: e.g. " (and ranks [1,
    2])"), then the original class and message."""
    original = getattr(type(error), "_original", type(error))
    fields = {**error.fields(), "rank": rank, "host": host, "phase": phase, "cause": original.__name__}
    message = f"The load failed during {phase} on rank {rank}{others} (host {host}): {original.__name__}: {error}"
    return _rebuild(peer_class(original), message, fields)


def _all_subclasses(base: type) -> list[type]:
    out = []
    for sub in base.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out
