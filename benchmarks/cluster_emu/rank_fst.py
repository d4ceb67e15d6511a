"""fastsafetensors baseline, one rank: files spread over the ranks (each file read by one rank,
``nogds`` on CPU), then every tensor fetched by every rank (a gloo broadcast from its reader).

Run by torchrun inside an emulated node (:mod:`benchmarks.cluster_emu.run`).
"""
from __future__ import annotations

import argparse
from typing import Any

from benchmarks.cluster_emu import rank_common


def load(source: str, args: argparse.Namespace) -> tuple[Any, dict]:
    from benchmarks.loaders import fastsafetensors_state
    state = fastsafetensors_state(source)
    return state, {"owned_bytes": rank_common.touch_all(state)}


if __name__ == "__main__":
    raise SystemExit(rank_common.main("fastsafetensors", load, rank_common.parse_args()))
