"""``weightcast load`` (N local ranks, plan summary + gathered report, ``--verify``) and
``weightcast demo`` (the same on a tiny built-in checkpoint)."""
from __future__ import annotations

import argparse
import json
import os

from weightcast.launch.cli_args import add_storage_option, parse_storage_options
from weightcast.orchestrator.errors import LoadError


def add_load_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``load``, ``weightcast.launch.torchrun`` and ``weightcast.launch.ray_job``."""
    p.add_argument("--device-map", default="replicate", help="replicate | auto | tp | FILE.json")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--tp-size", type=int, default=None)
    p.add_argument("--transport", default="auto", choices=["auto", "node-shared", "collective"])
    p.add_argument("--cluster", default=None, help="cluster YAML (default: detected from the ranks)")
    p.add_argument("--model", default="none", help="none (state dict) | auto (transformers class)")
    p.add_argument("--revision", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck load fails")
    p.add_argument("--threads", type=int, default=4, help="read threads per rank")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--verify", action="store_true", help="compare every owned tensor with safetensors, bit for bit")
    p.add_argument("--verify-checksums", action="store_true",
                   help="check each owned tensor against the crc32 the checkpoint's metadata records")
    add_storage_option(p, "s3:// sources: a storage_options entry (endpoint_url, region_name, profile_name, "
                          "request_bytes, concurrency, max_attempts, ...); repeatable")


def job_args(args: argparse.Namespace) -> dict:
    """The JSON-able options a rank function receives."""
    return {"source": args.source, "device_map": args.device_map, "dtype": args.dtype, "tp_size": args.tp_size,
            "transport": args.transport, "cluster": args.cluster, "model": args.model, "revision": args.revision,
            "cache_dir": args.cache_dir, "timeout": args.timeout, "threads": args.threads,
            "allow_pickle": args.allow_pickle or None, "trust_remote_code": args.trust_remote_code or None,
            "verify": args.verify, "verify_checksums": getattr(args, "verify_checksums", False) or None,
            "storage_options": parse_storage_options(getattr(args, "storage_option", None))}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("load", help="load a checkpoint on N local ranks and print the report")
    p.add_argument("source", help="checkpoint directory, .safetensors file, hub repo id or s3://bucket/prefix")
    p.add_argument("--nproc", type=int, default=2, help="number of local ranks")
    p.add_argument("--report", default=None, help="write the gathered report JSON here")
    p.add_argument("--plot", default=None, help="write a per-rank timeline PNG here")
    add_load_options(p)
    p.set_defaults(func=run_load)
    d = sub.add_parser("demo", help="build a tiny checkpoint, plan it and load it on several local ranks")
    d.add_argument("--nproc", type=int, default=2)
    d.add_argument("--dir", default="demo_checkpoint")
    d.set_defaults(func=run_demo)


def check_cli_options(args: argparse.Namespace) -> None:
    """The numeric options of ``load``/``save``/``torchrun`` (ConfigError: the CLI exits 2)."""
    from weightcast.orchestrator.options import MAX_THREADS, check_count, check_timeout
    check_timeout(args.timeout, "--timeout")
    if getattr(args, "threads", None) is not None:
        check_count(args.threads, "--threads", maximum=MAX_THREADS, fix="pass 1 to 16 read threads per rank")
    if getattr(args, "tp_size", None) is not None:
        check_count(args.tp_size, "--tp-size", fix="pass the ranks per tensor-parallel group, or leave it out")


def run_load(args: argparse.Namespace) -> int:
    from weightcast.launch.local import check_nproc, spawn
    check_nproc(args.nproc)
    check_cli_options(args)
    from weightcast.workers.report import LoadReport, format_table, plot_timeline
    results = spawn(args.nproc, "weightcast.launch.jobs:load_job", job_args(args), timeout=args.timeout + 120)
    rank0 = results[0].value
    report = rank0["report"]
    reports = [LoadReport(**r) for r in report["ranks"]]
    print(format_table(reports))
    print(f"storage bytes read: {report['total_read_bytes']:,} (checkpoint {report['checkpoint_bytes']:,}); "
          f"wall {report['wall_seconds']:.3f} s")
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.plot:
        plot_timeline(reports, args.plot)
    if args.verify:
        bad = {r.rank: r.value["mismatches"] for r in results if r.value["mismatches"]}
        total = sum(r.value["verified"] for r in results)
        if bad:
            raise LoadError("Loaded tensors differ from safetensors", where=f"ranks {sorted(bad)}",
                            got=json.dumps(bad)[:2000], fix="report this as a bug with the plan JSON")
        print(f"verify: {total} owned tensors on {len(results)} ranks identical to safetensors.load_file")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from weightcast.launch.cmd_plan import run_plan
    from weightcast.launch.local import check_nproc
    check_nproc(args.nproc)
    from weightcast.orchestrator.synth import write_synthetic
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        write_synthetic(args.dir, like="tiny", random=True, max_shard_size="200KB")
        print(f"wrote a tiny random Llama-style checkpoint to {args.dir}/")
    for device_map in ("replicate", "tp"):
        print(f"\n== plan: {device_map} on {args.nproc} local ranks ==")
        run_plan(argparse.Namespace(**_plan_args(args, device_map)))
        print(f"\n== load: {device_map} on {args.nproc} local ranks, verified against safetensors ==")
        ns = argparse.ArgumentParser()
        add_load_options(ns)
        load_args = ns.parse_args(["--device-map", device_map, "--verify"])
        load_args.source, load_args.nproc, load_args.report, load_args.plot = args.dir, args.nproc, None, None
        run_load(load_args)
    return 0


def _plan_args(args: argparse.Namespace, device_map: str) -> dict:
    from weightcast.launch.cmd_plan import plan_defaults
    out = plan_defaults()
    out.update(source=args.dir, nodes=1, gpus_per_node=None, cpus_per_node=args.nproc, device_map=device_map)
    return out
