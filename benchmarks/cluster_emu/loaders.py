"""The loaders a sweep can run: key -> label, rank module, weightcast device map. Pure data.

Each rank module has ``load(source, args) -> (result, figures)`` (and optionally
``prepare(args)``, run once before the first trial) and runs alone with
``python -m <module>``; :mod:`benchmarks.cluster_emu.rank_main` runs several in one launch.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoaderSpec:
    key: str
    label: str
    module: str
    device_map: str | None = None  # weightcast's device map (and the cost model's)
    requires: tuple[str, ...] = ()  # modules the loader imports


def unavailable(spec: LoaderSpec) -> str | None:
    """Why ``spec`` cannot run here (a module it needs is not installed), or None."""
    for module in spec.requires:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {module})"
    return None


LOADERS: dict[str, LoaderSpec] = {spec.key: spec for spec in (
    LoaderSpec("naive", "naive load_file", "benchmarks.cluster_emu.rank_naive", None, ("safetensors",)),
    LoaderSpec("hf", "from_pretrained", "benchmarks.cluster_emu.rank_hf", None, ("transformers",)),
    LoaderSpec("fst", "fastsafetensors", "benchmarks.cluster_emu.rank_fst", None, ("fastsafetensors",)),
    *(LoaderSpec(f"wc-{m}", f"weightcast {m}", "benchmarks.cluster_emu.rank_weightcast", m)
      for m in ("replicate", "tp", "auto")),
)}
DEFAULT_KEYS = tuple(LOADERS)
