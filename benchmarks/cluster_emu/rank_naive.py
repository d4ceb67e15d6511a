"""Naive baseline, one rank: ``safetensors.torch.load_file`` of every shard, every tensor touched.

Run by torchrun inside an emulated node (:mod:`benchmarks.cluster_emu.run`); every rank reads
the whole checkpoint, so storage serves it once per node (the node's ranks share its page cache).
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Any

from benchmarks.cluster_emu import rank_common


def load(source: str, args: argparse.Namespace) -> tuple[Any, dict]:
    from safetensors.torch import load_file
    shards = []
    touched = 0
    for path in sorted(glob.glob(os.path.join(source, "*.safetensors"))):
        state = load_file(path)
        touched += rank_common.touch_all(state)
        shards.append(state)
    figures = {"owned_bytes": touched}
    if args.verify:
        figures["digests"] = {k: v for state in shards for k, v in rank_common.digests(state).items()}
    return shards, figures


if __name__ == "__main__":
    raise SystemExit(rank_common.main("naive", load, rank_common.parse_args()))
