"""Every loader of a sweep in one torchrun launch: one process group, each loader's trials in
turn, one JSON per loader (``OUT/<key>.json``), a ``OUT/<key>.started`` mark before each.

Run by torchrun inside each emulated node (:mod:`benchmarks.cluster_emu.harness`); every rank
runs it (collective). A loader that raises ends the launch; the harness sees which loader
started without finishing and relaunches the rest. Importing torch and transformers in each
rank costs tens of seconds on a small machine: paying it once per sweep, not once per loader,
is why the loaders share a launch. Timings never include it.
"""
from __future__ import annotations

import argparse
import importlib
import os

from benchmarks.cluster_emu import rank_common
from benchmarks.cluster_emu.loaders import LOADERS


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loaders", required=True, help="comma-separated keys of loaders.LOADERS")
    p.add_argument("--cluster", default=None, help="cluster YAML for weightcast")
    p.add_argument("--device-map", default="replicate")


def main() -> int:
    import torch.distributed as dist
    args = rank_common.parse_args(extra=_options)
    keys = [k for k in args.loaders.split(",") if k]
    unknown = [k for k in keys if k not in LOADERS]
    if unknown:
        raise SystemExit(f"unknown loaders {unknown}; known: {sorted(LOADERS)}")
    os.makedirs(args.out, exist_ok=True)
    rank_common.init_group(args)
    for key in keys:
        spec = LOADERS[key]
        module = importlib.import_module(spec.module)
        if spec.device_map is not None:
            args.device_map = spec.device_map
        if dist.get_rank() == 0:
            open(os.path.join(args.out, f"{key}.started"), "w").close()
        if hasattr(module, "prepare"):
            module.prepare(args)
        rank_common.run_trials(spec.label, module.load, args, os.path.join(args.out, f"{key}.json"))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
