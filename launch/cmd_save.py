"""``weightcast save SOURCE OUT``: load SOURCE on N local ranks (``load_pretrained``) and save it
back with ``save_pretrained``: re-sharded (``--max-shard-size``), optionally cast (``--dtype``),
written by every rank in parallel and swapped into OUT atomically (OUT may be SOURCE).

:func:`save_job` is the rank function :func:`weightcast.launch.local.spawn` runs on each rank.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from weightcast.launch.cli_args import add_storage_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("save", help="load a checkpoint on N local ranks and save it back sharded, atomically")
    p.add_argument("source", help="checkpoint directory, .safetensors file, hub repo id or s3://bucket/prefix")
    p.add_argument("out", help="output directory (replaced atomically if it exists; other files in it are kept), "
                   "or s3://bucket/prefix (saved to a local temporary directory, then uploaded: small files, "
                   "shards with multipart uploads, the index last)")
    p.add_argument("--nproc", type=int, default=2, help="number of local ranks")
    p.add_argument("--max-shard-size", default="5GB", help='largest shard file, e.g. "5GB", "500MB" (decimal units)')
    p.add_argument("--dtype", default="auto", help="auto (keep) | bfloat16 | float16 | float32")
    p.add_argument("--device-map", default="replicate",
                   help="how the ranks hold the model while saving: replicate | auto | tp (every rank writes)")
    p.add_argument("--tp-size", type=int, default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (converted to safetensors)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck rank fails the save")
    add_storage_option(p, "s3:// source or output: a storage_options entry; repeatable")
    p.set_defaults(func=run_save)


def run_save(args: argparse.Namespace) -> int:
    from weightcast.launch.cmd_load import check_cli_options
    from weightcast.launch.local import check_nproc, spawn
    from weightcast.orchestrator.save_plan import parse_shard_size
    check_nproc(args.nproc)
    check_cli_options(args)
    parse_shard_size(args.max_shard_size)  # a bad size fails here, before any rank starts
    from weightcast.launch.cli_args import parse_storage_options
    from weightcast.orchestrator.object_source import is_object_url, parse_object_url
    options = parse_storage_options(args.storage_option)
    upload_to = args.out if is_object_url(args.out) else None
    if upload_to:
        parse_object_url(upload_to)
    scratch = tempfile.mkdtemp(prefix="weightcast-save-") if upload_to else None
    out = os.path.join(scratch, "checkpoint") if scratch else args.out
    job = {"source": args.source, "out": out, "max_shard_size": args.max_shard_size, "dtype": args.dtype,
           "device_map": args.device_map, "tp_size": args.tp_size, "revision": args.revision,
           "cache_dir": args.cache_dir, "allow_pickle": bool(args.allow_pickle), "timeout": args.timeout,
           "storage_options": options}
    try:
        results = spawn(args.nproc, "weightcast.launch.cmd_save:save_job", job, timeout=2 * args.timeout + 120)
        if upload_to:
            from weightcast.workers.s3_upload import upload_checkpoint
            upload_checkpoint(out, upload_to, options)
            results[0].value["out"] = upload_to
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    r0 = results[0].value
    load_s = max(r.value["load_seconds"] for r in results)
    save_s = max(r.value["save_seconds"] for r in results)
    print(f"saved {r0['tensors']} tensors, {r0['total_size']:,} bytes, in {len(r0['files'])} file(s) to "
          f"{r0['out']} from {args.nproc} ranks (load {load_s:.2f} s, save {save_s:.2f} s)")
    return 0


def save_job(args: dict) -> dict:
    """One rank: load what this rank holds, then save collectively; rank 0 adds a summary."""
    from weightcast.workers.api import load_pretrained
    from weightcast.workers.save import save_pretrained
    rank = int(os.environ.get("RANK", 0))
    t0 = time.perf_counter()
    tensors = load_pretrained(args["source"], model=None, dtype=args.get("dtype") or "auto",
                              device_map=args.get("device_map") or "replicate", tp_size=args.get("tp_size"),
                              revision=args.get("revision"), cache_dir=args.get("cache_dir"),
                              allow_pickle=bool(args.get("allow_pickle")), timeout=args["timeout"], progress=False,
                              storage_options=args.get("storage_options"))
    t1 = time.perf_counter()
    config, order = _source_facts(args) if rank == 0 else (None, None)
    save_pretrained(tensors, args["out"], max_shard_size=args["max_shard_size"], config=config,
                    timeout=args["timeout"], order=order)
    out = {"rank": rank, "load_seconds": t1 - t0, "save_seconds": time.perf_counter() - t1}
    if rank == 0:
        out.update(_summary(args["out"]))
    return out


def _source_facts(args: dict) -> tuple[dict | None, list[str] | None]:
    """Rank 0: the source's config (dtype updated when cast) and the save order: the names in
    transformers' re-save order (``from_pretrained`` then ``save_pretrained`` sorts them
    naturally), so the files match what transformers writes for the same ``max_shard_size``."""
    from weightcast.orchestrator.object_source import is_object_url
    from weightcast.orchestrator.save_plan import natural_key
    from weightcast.orchestrator.source import resolve_source
    names = None
    if is_object_url(args["source"]):
        from weightcast.workers.s3 import resolve_and_index
        src, index = resolve_and_index(args["source"], storage_options=args.get("storage_options"))
        names = index.names
    else:
        src = resolve_source(args["source"], revision=args.get("revision"), cache_dir=args.get("cache_dir"),
                             local_files_only=True, allow_pickle=bool(args.get("allow_pickle")))
    config = dict(src.config) if src.config else None
    dtype = args.get("dtype") or "auto"
    if config is not None and dtype != "auto":
        config.pop("torch_dtype", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
    if names is None:
        if src.kind != "safetensors":
            return config, None
        from weightcast.orchestrator.checkpoint import load_index
        names = load_index(src.root, cache_root=src.cache_root).names
    return config, sorted(names, key=natural_key)


def _summary(out: str) -> dict:
    from weightcast.orchestrator.checkpoint import load_index
    index = load_index(os.path.realpath(out))
    return {"out": index.root, "files": [f.name for f in index.files], "total_size": index.total_bytes,
            "tensors": len(index.tensors)}
