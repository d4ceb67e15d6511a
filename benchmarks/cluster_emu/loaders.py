"""The loaders a sweep can run: key -> label, rank module, weightcast device map. Pure data.

Each rank module has ``load(source, args) -> (result, figures)`` (and optionally
``prepare(args)``, run once before the first trial) and runs alone with
``python -m <module>``; :mod:`benchmarks.cluster_emu.rank_main` runs several in one launch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoaderSpec:
    key: str
    label: str
    module: str
    device_map: str | None = None  # weightcast's device map (and the cost model's)


LOADERS: dict[str, LoaderSpec] = {spec.key: spec for spec in (
    LoaderSpec("naive", "naive load_file", "benchmarks.cluster_emu.rank_naive"),
    LoaderSpec("hf", "from_pretrained", "benchmarks.cluster_emu.rank_hf"),
    LoaderSpec("fst", "fastsafetensors", "benchmarks.cluster_emu.rank_fst"),
    *(LoaderSpec(f"wc-{m}", f"weightcast {m}", "benchmarks.cluster_emu.rank_weightcast", m)
      for m in ("replicate", "tp", "auto")),
)}
DEFAULT_KEYS = tuple(LOADERS)
