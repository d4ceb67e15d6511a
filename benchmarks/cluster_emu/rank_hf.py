"""transformers baseline, one rank: ``AutoModelForCausalLM.from_pretrained(dtype="auto")``, every
parameter page touched (on CPU the parameters are lazy views of a private mmap).

Run by torchrun inside an emulated node (:mod:`benchmarks.cluster_emu.run`).
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks.cluster_emu import rank_common


def prepare(args: argparse.Namespace) -> None:
    """Import transformers and the model class before the first trial (imports are not loading)."""
    import importlib

    from transformers import AutoConfig
    kind = AutoConfig.from_pretrained(args.source).model_type
    importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")


def load(source: str, args: argparse.Namespace) -> tuple[Any, dict]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    return model, {"owned_bytes": rank_common.touch_all(model)}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(rank_common.main("from_pretrained", load, rank_common.parse_args(), prepare))
