"""weightcast, one rank: ``weightcast.workers.api.load_pretrained`` (state dict of what this rank owns),
every tensor page touched.

Run by torchrun inside an emulated node (:mod:`benchmarks.cluster_emu.run`); the node name each
rank reports comes from ``WEIGHTCAST_NODE`` (the namespace's name), as the cluster YAML lists it.
"""
from __future__ import annotations

import argparse
from typing import Any

from benchmarks.cluster_emu import rank_common


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", default="replicate")
    p.add_argument("--cluster", default=None, help="cluster YAML (storage: shared)")


def load(source: str, args: argparse.Namespace) -> tuple[Any, dict]:
    from weightcast.workers.api import load_pretrained
    state, report = load_pretrained(source, device_map=args.device_map, cluster=args.cluster,
                                    model=None, return_report=True, progress=False,
                                    timeout=args.timeout)
    figures = {"owned_bytes": rank_common.touch_all(state), "report": _mine(report)}
    if args.verify:
        figures["digests"] = rank_common.digests(state)
    return state, figures


def _mine(report: Any) -> Any:
    """This rank's entry of the gathered report (read, received, sent bytes, phases)."""
    import torch.distributed as dist
    if isinstance(report, dict):
        for entry in report.get("ranks", []):
            if isinstance(entry, dict) and entry.get("rank") == dist.get_rank():
                return entry
        return {k: v for k, v in report.items() if k != "ranks"}
    return str(report)[:2000]


if __name__ == "__main__":
    args = rank_common.parse_args(extra=_options)
    raise SystemExit(rank_common.main(f"weightcast-{args.device_map}", load, args))
