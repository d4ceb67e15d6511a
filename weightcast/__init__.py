"""weightcast: load large safetensors checkpoints onto many processes, GPUs and nodes at once.

``import weightcast as wc; model = wc.load_pretrained("org/repo", device_map="tp")`` on every rank.

The public surface is ``__all__``; everything else lives in the sub-packages
``weightcast.orchestrator`` (pure planning), ``weightcast.workers`` (per-rank execution) and
``weightcast.launch`` (how processes start). Importing ``weightcast`` does not import torch:
the names below are resolved on first use.
"""
from __future__ import annotations

import importlib
import os
from importlib import metadata as _metadata

# In a source checkout the sub-packages are the repository's top-level folders (a wheel maps
# them under weightcast/ through setuptools' package-dir): make them importable as
# weightcast.orchestrator etc. without an install.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if not os.path.isdir(os.path.join(_HERE, "orchestrator")) and os.path.isfile(
        os.path.join(_ROOT, "orchestrator", "__init__.py")):
    __path__.append(_ROOT)  # type: ignore[name-defined]  # noqa: F821

try:
    __version__ = _metadata.version("weightcast")
except _metadata.PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    # per-rank calls (collective)
    "load_pretrained": "weightcast.workers.api",
    "save_pretrained": "weightcast.workers.save",
    "checksum_metadata": "weightcast.workers.reader",
    "load_training_state": "weightcast.workers.training_state",
    "save_training_state": "weightcast.workers.training_save",
    "WeightcastTrainer": "weightcast.launch.trainer",
    "load_on_ray": "weightcast.launch.ray",
    # inspection
    "load_index": "weightcast.orchestrator.checkpoint",
    "CheckpointIndex": "weightcast.orchestrator.checkpoint",
    # cluster and device maps
    "ClusterSpec": "weightcast.orchestrator.cluster",
    "RankSpec": "weightcast.orchestrator.cluster",
    "load_cluster": "weightcast.orchestrator.cluster",
    "ClusterDeviceMap": "weightcast.orchestrator.device_map",
    "Replicate": "weightcast.orchestrator.device_map",
    "Shard": "weightcast.orchestrator.device_map",
    "Place": "weightcast.orchestrator.device_map",
    "build_device_map": "weightcast.orchestrator.device_map",
    # errors
    "WeightcastError": "weightcast.orchestrator.errors",
    "CheckpointFormatError": "weightcast.orchestrator.errors",
    "CheckpointNotFoundError": "weightcast.orchestrator.errors",
    "UnsafePathError": "weightcast.orchestrator.errors",
    "PickleRefusedError": "weightcast.orchestrator.errors",
    "RemoteCodeRefusedError": "weightcast.orchestrator.errors",
    "ConfigError": "weightcast.orchestrator.errors",
    "DeviceMapError": "weightcast.orchestrator.errors",
    "PlanError": "weightcast.orchestrator.errors",
    "CacheError": "weightcast.orchestrator.errors",
    "ModelMismatchError": "weightcast.orchestrator.errors",
    "StorageError": "weightcast.orchestrator.errors",
    "LoadError": "weightcast.orchestrator.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightcast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
