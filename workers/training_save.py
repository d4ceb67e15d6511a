"""``save_training_state``: write a Trainer-layout checkpoint from a DDP or FSDP2 job, every rank
writing what it holds, atomically.

Collective: every rank calls it with its model, optimizer and scheduler. Steps:

1. **Weights**: :func:`weightcast.workers.save.save_pretrained` of the model (DTensors included)
   into a fresh staging directory beside the target (``.NAME.wc-<id>``).
2. **optimizer.pt**: one ``torch.save``-compatible zip (:mod:`weightcast.orchestrator.torch_zip_write`).
   Every rank computes the same layout from its optimizer's state dict (full shapes of DTensor
   states); rank 0 creates the file at its final size; then each rank ``pwrite``\\ s, in parallel,
   the storages assigned to it: the rows of every ``Shard(0)`` state it holds (FSDP2: no gather at
   all) and, for states every rank holds whole (DDP), a share balanced by bytes. The CRC-32 of each
   segment is gathered and rank 0 writes headers, ``data.pkl`` and the central directory.
3. **Small files**: ``rng_state_<rank>.pth`` on every rank (``rng_state.pth`` for one process, as
   Trainer names them), ``scheduler.pt``, ``scaler.pt`` and ``trainer_state.json`` on rank 0;
   every file fsynced.
4. **Commit** (rank 0): the staging directory replaces ``checkpoint_dir`` in one rename (an
   existing one is exchanged or parked, then removed).

A failure or a dead rank at any step makes every surviving rank raise and remove the staging
directory; ``checkpoint_dir`` is untouched until step 4.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
import zlib
from typing import Any, Callable

import torch

from weightcast.orchestrator.torch_zip_write import (StorageSpec, central_directory,
                                                     combine_segments, local_header, state_pickle, zip_layout)
from weightcast.workers.collectives import all_gather_bytes
from weightcast.workers.coordinator import coordinate, run_step
from weightcast.workers.group import Group
from weightcast.workers.process_group import setup_group, teardown_group

Hook = Callable[[str, int], None]
ARCHIVE = "optimizer"


def save_training_state(checkpoint_dir: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None,
                        scheduler: Any = None, *, scaler: Any = None, trainer_state: Any = None,
                        rng: bool = True, max_shard_size: int | str = "5GB", timeout: float = 300.0,
                        _fault_hook: Hook | None = None) -> str:
    """Write the Trainer layout to ``checkpoint_dir`` (collective, atomic; see the module
    docstring); returns its absolute path. ``trainer_state``: a dict or a transformers
    ``TrainerState`` written as ``trainer_state.json``. ``rng``: save each rank's RNG state."""
    out = os.path.abspath(os.fspath(checkpoint_dir))
    hook = _fault_hook or (lambda phase, rank: None)
    group = setup_group(timeout)
    ok = False
    staging = None
    try:
        staging = coordinate(group, lambda: _staging_name(out).encode()).decode()
        _save(group, out, staging, model, optimizer, scheduler, scaler, trainer_state, rng, max_shard_size,
              timeout, hook)
        ok = True
    finally:
        if not ok and staging and group.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        teardown_group(group, ok)
    return out


def _staging_name(out: str) -> str:
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)  # as Trainer creates its output_dir
    return os.path.join(parent, f".{os.path.basename(out)}.wc-{uuid.uuid4().hex[:12]}")


def _save(group: Group, out: str, staging: str, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
          trainer_state: Any, rng: bool, max_shard_size: int | str, timeout: float, hook: Hook) -> None:
    from weightcast.workers.save import save_pretrained
    hook("weights", group.rank)
    state, owned, config = _weights(model)
    save_pretrained(state, staging, max_shard_size=max_shard_size, timeout=timeout, owned=owned, config=config)
    job = _OptimizerJob(optimizer, group) if optimizer is not None else None
    if job is not None:
        run_step(group, "prepare", lambda: job.create(staging) if group.rank == 0 else None)
        run_step(group, "write", lambda: (hook("optimizer", group.rank), job.write(staging)))
        segments = [json.loads(b) for b in all_gather_bytes(group, json.dumps(job.segments).encode())]
        run_step(group, "finish", lambda: job.finish(staging, segments) if group.rank == 0 else None)
    run_step(group, "small files", lambda: _small_files(group, staging, scheduler, scaler, trainer_state, rng))
    hook("commit", group.rank)
    run_step(group, "commit", lambda: _commit(staging, out) if group.rank == 0 else None)


def _weights(model: torch.nn.Module) -> tuple[Any, Any, dict | None]:
    """What save_pretrained gets: the module itself, or for FSDP2 each parameter's local rows with
    the slice they cover (tied duplicates dropped) and the model's config."""
    from weightcast.workers.training_apply import _is_sharded, is_fsdp
    if not is_fsdp(model):
        return model, None, None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    tensors, owned, seen = {}, {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if _is_sharded(t):
            shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            owned[name] = (0, offset[0], offset[0] + shape[0], tuple(t.shape))
            t = t.to_local()
        tensors[name] = t.detach()
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None
    return tensors, {n: owned.get(n) for n in tensors}, config


class _OptimizerJob:
    """The layout of ``optimizer.pt`` and what this rank writes into it."""

    def __init__(self, optimizer: Any, group: Group) -> None:
        self.rank = group.rank
        sd = optimizer.state_dict()
        self.tensors: list[tuple[StorageSpec, torch.Tensor]] = []
        skeleton = self._specs(sd)
        self.pickle = state_pickle(skeleton)
        members = [(f"{ARCHIVE}/data.pkl", len(self.pickle)), (f"{ARCHIVE}/byteorder", 6)]
        members += [(f"{ARCHIVE}/data/{s.key}", s.nbytes) for s, _ in self.tensors]
        members.append((f"{ARCHIVE}/version", 2))
        self.members, self.cd_offset = zip_layout(members)
        self.by_key = {m.name.rsplit("/", 1)[1]: m for m in self.members if "/data/" in m.name}
        self.writers = _assign(self.tensors, group.world_size)
        self.segments: list[list] = []

    def _specs(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            spec = StorageSpec(str(len(self.tensors)), str(obj.dtype).removeprefix("torch."), tuple(obj.shape),
                               obj.element_size())
            self.tensors.append((spec, obj))
            return spec
        if isinstance(obj, dict):
            return type(obj)((k, self._specs(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._specs(v) for v in obj)
        return obj

    def create(self, staging: str) -> None:
        """Rank 0: the file at its final size (every rank then writes into it)."""
        with open(os.path.join(staging, "optimizer.pt"), "wb") as f:
            f.truncate(self.cd_offset)

    def write(self, staging: str) -> None:
        """This rank's segments, each ``pwrite`` at its final offset; CRC-32 of each recorded."""
        fd = os.open(os.path.join(staging, "optimizer.pt"), os.O_WRONLY)
        try:
            for spec, t in self.tensors:
                part = _my_part(t, self.writers[spec.key], self.rank)
                if part is None:
                    continue
                start, data = part
                m = self.by_key[spec.key]
                _pwrite_all(fd, data, m.offset + start)
                self.segments.append([spec.key, start, len(data), zlib.crc32(data)])
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self, staging: str, segments: list[list[list]]) -> None:
        """Rank 0: headers, small members, central directory, end records; fsync."""
        by_key: dict[str, list[tuple[int, int, int]]] = {}
        for rank_segments in segments:
            for key, start, length, crc in rank_segments:
                by_key.setdefault(key, []).append((start, length, crc))
        small = {f"{ARCHIVE}/data.pkl": self.pickle, f"{ARCHIVE}/byteorder": b"little", f"{ARCHIVE}/version": b"3\n"}
        crcs = []
        fd = os.open(os.path.join(staging, "optimizer.pt"), os.O_WRONLY)
        try:
            for m in self.members:
                crc = zlib.crc32(small[m.name]) if m.name in small else \
                    combine_segments(by_key.get(m.name.rsplit("/", 1)[1], []), m.size)
                crcs.append(crc)
                _pwrite_all(fd, local_header(m, crc), m.header_offset)
                if m.name in small:
                    _pwrite_all(fd, small[m.name], m.offset)
            _pwrite_all(fd, central_directory(self.members, crcs, self.cd_offset), self.cd_offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(os.path.join(staging, "optimizer.pt"), 0o644)


def _assign(tensors: list[tuple[StorageSpec, torch.Tensor]], world: int) -> dict[str, Any]:
    """Writer of each storage: ``"shard"`` for a Shard(0) DTensor (each holder writes its rows),
    else the least-loaded rank, largest storages first (the same on every rank)."""
    load = [0] * world
    out: dict[str, Any] = {}
    for spec, t in sorted(tensors, key=lambda st: (-st[0].nbytes, int(st[0].key))):
        if _is_row_sharded(t):
            out[spec.key] = "shard"
            continue
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += spec.nbytes
        out[spec.key] = rank
    return out


def _is_row_sharded(t: torch.Tensor) -> bool:
    from weightcast.workers.training_apply import _is_sharded
    return _is_sharded(t)


def _my_part(t: torch.Tensor, writer: Any, rank: int) -> tuple[int, memoryview] | None:
    """(byte offset inside the storage, bytes) this rank writes, or None."""
    if writer == "shard":
        mesh = t.device_mesh
        if mesh.ndim > 1 and mesh.get_local_rank(0) != 0:
            return None  # HSDP: the first replica writes
        from weightcast.orchestrator.device_map_fsdp import fsdp_bounds
        start, _ = fsdp_bounds(t.shape[0], mesh.size(mesh.ndim - 1), mesh.get_local_rank(mesh.ndim - 1))
        local = t.to_local()
        row = local.element_size() * (local[0].numel() if local.dim() and local.shape[0] else 0)
        return (start * row, _bytes(local)) if local.numel() else None
    if writer != rank:
        return None
    return 0, _bytes(t)


def _bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _small_files(group: Group, staging: str, scheduler: Any, scaler: Any, trainer_state: Any, rng: bool) -> None:
    if rng:
        name = "rng_state.pth" if group.world_size == 1 else f"rng_state_{group.rank}.pth"
        _torch_save(rng_states(), os.path.join(staging, name))
    if group.rank != 0:
        return
    if scheduler is not None:
        _torch_save(scheduler.state_dict(), os.path.join(staging, "scheduler.pt"))
    if scaler is not None:
        _torch_save(scaler.state_dict(), os.path.join(staging, "scaler.pt"))
    if trainer_state is not None:
        path = os.path.join(staging, "trainer_state.json")
        if hasattr(trainer_state, "save_to_json"):
            trainer_state.save_to_json(path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
        _fsync(path)


def rng_states() -> dict:
    """This process's RNG states, as Trainer saves them."""
    import numpy as np
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def _torch_save(obj: Any, path: str) -> None:
    torch.save(obj, path)
    _fsync(path)


def _fsync(path: str) -> None:
    from weightcast.workers.save_fs import fsync_file
    fsync_file(path)


def _commit(staging: str, out: str) -> None:
    """Rank 0: the staging directory becomes ``out``: a rename, or an existing ``out`` exchanged
    with it in one step (renameat2; parked then replaced where the system cannot), then removed."""
    from weightcast.workers.save_fs import _exchange, discard, fsync_dir
    fsync_dir(staging)
    parent = os.path.dirname(out)
    if not os.path.lexists(out):
        os.rename(staging, out)
    elif _exchange(staging, out):
        discard(staging, "commit")  # now the previous checkpoint
    else:
        old = f"{staging}.old"
        os.rename(out, old)
        os.rename(staging, out)
        discard(old, "commit")
    fsync_dir(parent)
