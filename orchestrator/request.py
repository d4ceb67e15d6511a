"""``LoadRequest``: the arguments of one ``load_pretrained`` call, typed, validated once.

Built on every rank by :func:`weightcast.workers.api.load_pretrained` from its keyword arguments
(:meth:`LoadRequest.from_call`), identical on every rank; read by the prepare step
(:mod:`weightcast.orchestrator.prepare`, rank 0) and by the workers' phases (every rank).
Adding a load argument is one field here and one keyword parameter of ``load_pretrained``
(same name, same default): :meth:`LoadRequest.from_call` picks the fields by name.
Pure data: no torch import, not collective.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from weightcast.orchestrator.errors import ConfigError
from weightcast.orchestrator.options import check_load_options

TRANSPORTS = ("auto", "node-shared", "collective")


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One load's arguments (see ``load_pretrained`` for their meaning)."""
    source: str
    revision: str | None = None
    cache_dir: str | None = None
    local_files_only: bool | None = None
    token: str | None = None
    model: Any = "auto"
    device_map: Any = "replicate"
    dtype: Any = "auto"
    max_memory: dict | None = None
    tp_size: int | None = None
    cluster: Any = None
    transport: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    strict: bool = True
    timeout: float = 300.0
    bucket_bytes: int = 256 << 20
    chunk_bytes: int = 64 << 20
    threads: int = 4
    progress: bool = True
    return_report: bool = False
    report_memory: bool = True
    verify_checksums: bool = False
    key_mapping: dict | None = None
    storage_options: dict | None = None  # s3:// sources: client settings (workers.s3.S3Options)
    output_loading_info: bool = False
    zero_copy: bool = True  # False: every tensor in private memory, never a view of a checkpoint file
    model_kwargs: dict = dataclasses.field(default_factory=dict)  # from_pretrained's config overrides

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError("Unknown transport", where="transport argument", expected=f"one of {TRANSPORTS}",
                              got=repr(self.transport), fix="pass transport='auto' (or leave it out)")
        check_load_options(timeout=self.timeout, bucket_bytes=self.bucket_bytes, chunk_bytes=self.chunk_bytes,
                           threads=self.threads)

    @classmethod
    def from_call(cls, arguments: Mapping[str, Any]) -> "LoadRequest":
        """The request from a call's arguments (``locals()`` of ``load_pretrained``): every
        field taken by name; ``torch_dtype`` is the older name of ``dtype``."""
        values = {f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments}
        values["model_kwargs"] = dict(values.get("model_kwargs") or {})
        torch_dtype = arguments.get("torch_dtype")
        if torch_dtype is not None:
            dtype = values.get("dtype", "auto")
            if dtype not in ("auto", None, torch_dtype):
                raise ConfigError("Both dtype and torch_dtype were given", where="load_pretrained arguments",
                                  expected="one of them", got=f"dtype={dtype!r}, torch_dtype={torch_dtype!r}",
                                  fix="pass only dtype")
            values["dtype"] = torch_dtype
        return cls(**values)

    def node_source(self, node: str) -> str:
        """The source as seen on ``node``: ``{node}`` in a path is replaced by the node's name,
        so node-local copies may live in per-node directories."""
        return self.source.replace("{node}", node)
