"""``weightcast inspect SOURCE`` and ``weightcast synth OUT``.

``inspect`` resolves a local path or HF repo id, validates every header and the index, and
prints a summary (files, tensor count, total bytes, bytes per dtype, largest tensors, metadata)
or, with ``--json``, one JSON object. ``synth`` writes a synthetic Llama-shaped checkpoint
(sparse data unless ``--random``). Bad input raises a WeightcastError, which ``weightcast.launch.cli``
prints on stderr without a traceback (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from weightcast.launch.cli_args import add_storage_option, human_bytes, parse_storage_options
from weightcast.orchestrator.checkpoint import CheckpointIndex


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="summarise and validate a checkpoint",
                              description="Validate a safetensors checkpoint (local path or HF "
                              "repo id) and summarise it.")
    p.add_argument("source", metavar="SOURCE", help="directory, .safetensors file, org/name or s3://bucket/prefix")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--revision", help="branch, tag or commit (HF repos)")
    p.add_argument("--cache-dir", help="HF cache directory (default: huggingface_hub's)")
    p.add_argument("--local-files-only", action="store_true", help="never touch the network")
    p.add_argument("--top", type=int, default=10, help="largest tensors to list (default 10)")
    add_storage_option(p, "s3:// sources: a storage_options entry (e.g. endpoint_url=..., region_name=...)")
    p.set_defaults(func=run_inspect)

    s = subparsers.add_parser("synth", help="write a synthetic Llama-shaped checkpoint",
                              description="Write a checkpoint with real headers and sparse "
                              "(or random) data, shaped like a Llama model.")
    s.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty)")
    s.add_argument("--like", default="tiny",
                   choices=["tiny", "llama-1b", "llama-8b", "llama-70b", "llama-405b"])
    s.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16, float32, ...")
    s.add_argument("--max-shard-size", default="5GB", help="shard size limit, e.g. 5GB, 500MB")
    s.add_argument("--random", action="store_true", help="write random data (tiny, llama-1b)")
    s.add_argument("--seed", type=int, default=0, help="seed of --random")
    s.set_defaults(func=run_synth)


def dtype_bytes(index: CheckpointIndex) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in index.tensors:
        out[t.dtype] = out.get(t.dtype, 0) + t.length
    return dict(sorted(out.items()))


def summary_json(index: CheckpointIndex, source: Any = None) -> dict[str, Any]:
    """The ``--json`` object: files, num_tensors, total_bytes, dtypes, tensors, metadata."""
    per_file: dict[str, list[int]] = {f.name: [0, 0] for f in index.files}
    for t in index.tensors:
        per_file[t.file][0] += 1
        per_file[t.file][1] += t.length
    return {
        "root": index.root,
        "repo_id": getattr(source, "repo_id", None),
        "revision": getattr(source, "revision", None),
        "files": [{"name": f.name, "size": f.size, "data_start": f.data_start,
                   "num_tensors": per_file[f.name][0], "tensor_bytes": per_file[f.name][1],
                   "metadata": dict(f.metadata)} for f in index.files],
        "num_tensors": len(index.tensors),
        "total_bytes": index.total_bytes,
        "dtypes": dtype_bytes(index),
        "metadata": dict(index.metadata),
        "tensors": [{"name": t.name, "file": t.file, "dtype": t.dtype, "shape": list(t.shape),
                     "offset": t.offset, "length": t.length} for t in index.tensors],
    }


def _print_summary(summary: dict[str, Any], top: int, seconds: float) -> None:
    out = sys.stdout.write
    origin = f" ({summary['repo_id']} @ {summary['revision']})" if summary["repo_id"] else ""
    out(f"checkpoint: {summary['root']}{origin}\n")
    files = summary["files"]
    out(f"files: {len(files)}, {human_bytes(sum(f['size'] for f in files))} on disk\n")
    for f in files[:10]:
        meta = " ".join(f"{k}={v}" for k, v in sorted(f["metadata"].items()))
        out(f"  {f['name']}  {f['num_tensors']} tensors  {human_bytes(f['tensor_bytes'])}"
            f"{'  ' + meta if meta else ''}\n")
    if len(files) > 10:
        out(f"  ... {len(files) - 10} more\n")
    total = summary["total_bytes"]
    out(f"tensors: {summary['num_tensors']}, {human_bytes(total)} ({total} bytes)\n")
    out("bytes per dtype:\n")
    for code, n in summary["dtypes"].items():
        out(f"  {code:<8} {human_bytes(n):>10}  {100 * n / max(total, 1):5.1f}%\n")
    largest = sorted(summary["tensors"], key=lambda t: (-t["length"], t["name"]))[:max(top, 0)]
    if largest:
        out("largest tensors:\n")
        for t in largest:
            out(f"  {t['name']}  {t['dtype']}{t['shape']}  {human_bytes(t['length'])}  ({t['file']})\n")
    if summary["metadata"]:
        out(f"index metadata: {json.dumps(summary['metadata'], sort_keys=True)}\n")
    out(f"validated in {seconds * 1000:.1f} ms\n")


def run_inspect(args: argparse.Namespace) -> int:
    from weightcast.workers.s3 import resolve_and_index
    start = time.perf_counter()
    source, index = resolve_and_index(args.source, storage_options=parse_storage_options(args.storage_option),
                                      revision=args.revision, cache_dir=args.cache_dir,
                                      local_files_only=True if args.local_files_only else None)
    seconds = time.perf_counter() - start
    summary = summary_json(index, source)
    if args.json:
        json.dump(summary, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        _print_summary(summary, args.top, seconds)
    return 0


def _disk_usage(root: str) -> int:
    return sum(os.stat(os.path.join(root, n)).st_blocks * 512 for n in os.listdir(root))


def run_synth(args: argparse.Namespace) -> int:
    from weightcast.orchestrator.synth import write_synthetic
    index = write_synthetic(args.out, like=args.like, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, random=args.random, seed=args.seed)
    print(f"wrote {args.like} ({args.dtype}) to {index.root}: {len(index.files)} files, "
          f"{len(index.tensors)} tensors, {human_bytes(index.total_bytes)} of tensor data, "
          f"{human_bytes(_disk_usage(index.root))} on disk"
          f"{'' if args.random else ' (sparse)'}")
    return 0
