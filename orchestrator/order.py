"""``LoadOrder``: what rank 0's prepare step decided, the one message every rank executes.

Built by :func:`weightcast.orchestrator.prepare.prepare` (rank 0, or the ``plan`` command),
encoded once by :func:`weightcast.orchestrator.plan_codec.encode_order` and broadcast as one
bytes blob; every rank decodes it (:func:`~weightcast.orchestrator.plan_codec.decode_order`).
A leaf module: frozen data, no behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightcast.orchestrator.device_map_types import ClusterDeviceMap
from weightcast.orchestrator.plan_types import LoadPlan


@dataclass(frozen=True, slots=True)
class LoadOrder:
    """One load as decided on rank 0.

    ``kind``: ``"safetensors"`` (``plan`` and ``device_map`` set) or ``"pickle"`` (``files``
    set; every rank loads them itself). ``root``: the checkpoint directory (a URL for object
    storage); ``config``: config.json's dict or None; ``transport``: ``"node-shared"``,
    ``"collective"`` or ``"pickle"``; ``checkpoint_bytes``: the tensor bytes of the checkpoint;
    ``load_id``: names the load's staging areas; ``init_seed``: the seed every rank initialises
    missing parameters with; ``auto_dtype``: the dtype ``dtype="auto"`` falls back to;
    ``model_tp_size``: the group size of a transformers model's own tp plan (None: none);
    ``crc32``: ``{tensor: (file, crc32 hex)}`` for ``verify_checksums`` loads; ``disk``:
    ``{tensor: (file, rank)}`` of the tensors the map offloads to a rank's disk; ``targets``:
    ``{checkpoint key: parameter}`` where transformers' mapping renames a key, for a model spread
    over ranks (each rank then knows which parameters it holds).
    ``file_ids``: ``{file: (inode, ctime_ns)}`` rank 0 saw while planning (local files), so a file
    replaced or rewritten before a rank maps it is noticed even with size and mtime restored.
    ``local_root`` / ``local_stamps``: node-local storage only, set by each rank after it
    received the order (this node's copy: its root and ``{file: (size, mtime_ns)}``).
    """
    kind: str
    root: str
    config: dict | None
    transport: str
    load_id: str
    checkpoint_bytes: int = 0
    plan: LoadPlan | None = None
    device_map: ClusterDeviceMap | None = None
    files: tuple[str, ...] = ()
    init_seed: int = 0
    auto_dtype: str | None = None
    model_tp_size: int | None = None
    crc32: dict[str, tuple[str, str]] | None = None
    disk: dict[str, tuple[str, int]] | None = None
    targets: dict[str, str] | None = None
    local_stamps: dict[str, tuple[int, int]] | None = None
    file_ids: dict[str, tuple[int, int]] | None = None

    def with_local_copy(self, root: str, stamps: dict[str, Any]) -> "LoadOrder":
        """This order as seen on a node with its own copy (node-local storage)."""
        from dataclasses import replace
        return replace(self, root=root, local_stamps={k: (int(v[0]), int(v[1])) for k, v in stamps.items()})
