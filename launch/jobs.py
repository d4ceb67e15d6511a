"""Rank functions for :mod:`weightcast.launch.local` and ``weightcast.launch.torchrun``: load, verify, report.

Each takes a JSON-able dict of options and returns a JSON-able dict (rank 0's includes the
gathered report).
"""
from __future__ import annotations

import os
import time

LOAD_KEYS = ("revision", "cache_dir", "local_files_only", "device_map", "dtype", "tp_size", "cluster",
             "transport", "allow_pickle", "trust_remote_code", "strict", "timeout", "bucket_bytes",
             "chunk_bytes", "threads", "max_memory", "verify_checksums", "storage_options")


def load_options(args: dict) -> dict:
    """The load_pretrained keyword arguments found in ``args`` (None values dropped)."""
    opts = {k: args[k] for k in LOAD_KEYS if args.get(k) is not None}
    model = args.get("model", "none")
    opts["model"] = None if model in (None, "none") else model
    return opts


def _import(spec: str):
    import importlib
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def verify_owned(source_root: str, tensors: dict, storage_options: dict | None = None) -> list[str]:
    """Names whose bytes differ from ``safetensors`` reading the same tensor (or slice); for an
    ``s3://`` source, from each tensor's bytes fetched on their own with one ranged GET."""
    import torch
    from weightcast.workers.s3 import resolve_and_index
    _, index = resolve_and_index(source_root, storage_options=storage_options)
    by_file: dict[str, list[str]] = {}
    for name in tensors:
        by_file.setdefault(index.tensor(name).file, []).append(name)
    bad = []
    slices = getattr(tensors, "slices", {})
    for file, names in by_file.items():
        with _open_tensors(index, file, storage_options) as fh:
            for name in names:
                want = fh.get_tensor(name)
                sl = slices.get(name)
                if sl is not None:
                    want = want.narrow(sl[0], sl[1], sl[2] - sl[1])
                got = tensors[name]
                if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(
                        got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)):
                    bad.append(name)
    return bad


def _open_tensors(index, file: str, storage_options: dict | None):
    """``safe_open`` for a local file; for an object, a reader of single tensors by ranged GET."""
    import contextlib
    from safetensors import safe_open
    if not index.root.startswith("s3://"):
        return safe_open(os.path.join(index.root, file), framework="pt")

    import torch
    from weightcast.orchestrator.object_source import parse_object_url
    from weightcast.orchestrator.safetensors_dtypes import torch_dtype
    from weightcast.workers.s3 import S3Options, S3Store
    url = parse_object_url(index.root)
    store = S3Store(url.bucket, S3Options.from_dict(storage_options), deadline=time.monotonic() + 120)

    class _Object:
        def get_tensor(self, name: str):
            entry = index.tensor(name)
            raw = bytearray(store.read(url.child(file), entry.offset, entry.length, index.file(file).etag))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(torch_dtype(entry.dtype)).reshape(entry.shape)
    return contextlib.nullcontext(_Object())


def load_job(args: dict) -> dict:
    """Load ``args["source"]`` on this rank; optionally verify bit for bit; return the report."""
    from weightcast.workers.api import load_pretrained
    from weightcast.workers.testing import inject
    seams = {key: _import(args[key]) for key in ("reader_factory", "phase_hook") if args.get(key)}
    t0 = time.perf_counter()
    with inject(**seams):  # "module:function" names of fault-injection seams (tests)
        result, report = load_pretrained(args["source"], return_report=True, **load_options(args))
    out = {"rank": int(os.environ.get("RANK", 0)), "seconds": time.perf_counter() - t0}
    if args.get("verify"):
        if not isinstance(result, dict):
            result = {k: v for k, v in result.state_dict().items() if not v.is_meta}
        root = args.get("verify_root") or args["source"]
        out["mismatches"] = verify_owned(root, result, args.get("storage_options"))
        out["verified"] = len(result)
    if out["rank"] == 0:
        out["report"] = report
    return out
