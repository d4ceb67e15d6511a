"""fastsafetensors baseline, one rank: files spread over the ranks (each file read by one rank,
``nogds`` on CPU), then every tensor fetched by every rank (a gloo broadcast from its reader).

Run by torchrun inside an emulated node (:mod:`benchmarks.cluster_emu.run`).
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Any

from benchmarks.cluster_emu import rank_common


def load(source: str, args: argparse.Namespace) -> tuple[Any, dict]:
    import torch.distributed as dist
    from fastsafetensors import SafeTensorsFileLoader
    files = sorted(glob.glob(os.path.join(source, "*.safetensors")))
    world = dist.get_world_size()
    loader = SafeTensorsFileLoader(dist.group.WORLD, "cpu", nogds=True, set_numa=False)
    try:
        loader.add_filenames({r: files[r::world] for r in range(world) if files[r::world]})
        buffers = loader.copy_files_to_device()
        try:
            state = {key: buffers.get_tensor(key) for key in loader.get_keys()}
        finally:
            buffers.close()
    finally:
        loader.close()
    return state, {"owned_bytes": rank_common.touch_all(state)}


if __name__ == "__main__":
    raise SystemExit(rank_common.main("fastsafetensors", load, rank_common.parse_args()))
