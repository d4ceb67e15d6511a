"""``save_pretrained``: write a model held by one or many ranks as a transformers-style
checkpoint, atomically.

Collective over the default ``torch.distributed`` group when one is initialised (every rank
calls it, each passing what it holds), single-process otherwise. Four steps, each ending in an
exchange on a gloo group with the call's ``timeout``. A rank whose step fails posts its error
in the rendezvous store and closes its connections, so every peer fails at once and raises
that same :class:`LoadError`; a rank that dies or hangs is named by the first rank to notice
(see :mod:`weightcast.workers.save_liveness`):

1. collect: every rank describes its tensors (whole, or slices of a tensor-parallel weight);
   the manifests are gathered.
2. plan: rank 0 assigns tensors to shard files exactly as transformers does, picks a writer
   per file (the rank holding most of it), creates ``OUT.tmp-<id>`` beside the target and
   broadcasts the plan as one bytes blob.
3. write: each rank writes its files in parallel with the others, receiving the slices it
   lacks from their holders; rank 0 writes the index and ``config.json``; files are fsynced.
4. commit: rank 0 checks every file is there, fsyncs and swaps the directory into place.
A failure after step 2 makes every surviving rank remove the temporary directory; the previous
checkpoint at the target is never modified until the final swap.
"""
from __future__ import annotations

import os
import socket
import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from weightcast.orchestrator.errors import LoadError
from weightcast.orchestrator.options import check_timeout
from weightcast.orchestrator.save_plan import (CONFIG_NAME, INDEX_NAME, SavePlan, manifest_from_json, manifest_to_json,
                                    plan_from_json, plan_save, plan_to_json)
from weightcast.workers import save_fs
from weightcast.workers.collectives import all_gather_bytes, barrier, broadcast_bytes
from weightcast.workers.group import Group
from weightcast.workers.save_collect import Collected, collect, torch_dtype
from weightcast.workers.save_liveness import Watch

Hook = Callable[[str, str], None]
SEND_WINDOW = 1 << 30  # bytes copied for sends in flight (GPU or non-contiguous tensors) before waiting
_CALLS = [0]  # save calls made by this process: names this call's keys in the rendezvous store


def save_pretrained(state: dict[str, torch.Tensor] | torch.nn.Module, out_dir: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB", config: dict | None = None, timeout: float = 300.0,
                    owned: Any = None, order: list[str] | None = None, _fault_hook: Hook | None = None) -> None:
    """Save ``state`` to ``out_dir`` as ``model.safetensors`` (or ``model-0000k-of-0000n``
    shards + ``model.safetensors.index.json``) and ``config.json`` when a config is given (a
    module's ``.config`` is used when it has ``to_dict``).

    Collective when a default process group is initialised: every rank calls it with what it
    holds; a tensor held by several ranks is written once (by the writer of its file if it
    holds it, else by the lowest rank holding it); slices (``owned`` or ``state.slices``, see
    :func:`weightcast.workers.save_collect.collect`; DTensors too) are gathered so files hold full
    tensors. ``order`` optionally names the tensor order of the files (default: each rank's
    own order, merged). ``out_dir`` is replaced atomically if it exists; its non-weight files
    (tokenizer, ...) are kept. Files get mode 0644, directories 0755. Any failure on any rank
    raises LoadError on every rank within ``timeout`` seconds and leaves ``out_dir`` as it was.
    ``_fault_hook(event, detail)`` is called at each step (tests inject faults through it).
    """
    check_timeout(timeout)
    group = _open_group(timeout)
    _CALLS[0] += group.world_size > 1
    watch = Watch(group.rank, group.world_size, group.node, _CALLS[0])
    group.watch, group.hook = watch, _fault_hook or (lambda event, detail: None)
    try:
        _save(group, state, os.fspath(out_dir), max_shard_size, config, owned, order)
    finally:
        save_fs.release_all()
        watch.close()
        _drop(group)


def _open_group(timeout: float) -> Group:
    """This call's gloo group over every rank of the default group (collective), or one rank."""
    node = os.environ.get("WEIGHTCAST_NODE") or socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Group(0, 1, 0, 1, node, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    except Exception as exc:
        raise LoadError("The ranks could not form the save's process group", where=f"rank {rank} on host {node}",
                        got=f"{type(exc).__name__}: {str(exc)[:300]}",
                        fix="every rank of the default group must call save_pretrained; check that none died") from exc
    return Group(rank, world, rank, world, node, pg, pg, timeout)


def _drop(group: Group) -> None:
    """Close this call's gloo group: peers blocked on this rank fail at once, not at the timeout."""
    if group.pg is not None:
        pg, group.pg, group.data_pg = group.pg, None, None
        try:
            dist.destroy_process_group(pg)
        except Exception:  # noqa: BLE001 - already broken
            pass


def _save(group: Group, state: Any, out_dir: str, max_shard_size: int | str, config: dict | None,
          owned: Any, order: list[str] | None) -> None:
    hook = group.hook
    def collected() -> Collected:
        out = collect(state, group.rank, owned=owned, order=order, config=config)
        hook("collected", "")
        return out
    mine = _step(group, "collect", collected)
    blobs = _exchange(group, "collect", lambda: all_gather_bytes(group, manifest_to_json(mine.manifest)),
                      [manifest_to_json(mine.manifest)])
    manifests = [manifest_from_json(b) for b in blobs]
    blob = _step(group, "plan", lambda: _plan(manifests, max_shard_size, out_dir, group.world_size)) \
        if group.rank == 0 else b""
    plan = plan_from_json(_exchange(group, "plan", lambda: broadcast_bytes(group, blob), blob))
    cleanup = lambda: save_fs.cleanup(plan, f"r{group.rank}")  # noqa: E731
    _step(group, "write", lambda: _write(group, plan, mine), cleanup)
    _exchange(group, "write", lambda: barrier(group), None, cleanup)
    _step(group, "commit", lambda: _commit(group, plan), cleanup)
    _exchange(group, "commit", lambda: barrier(group), None, cleanup)


def _plan(manifests: list, max_shard_size: int | str, out_dir: str, world: int) -> bytes:
    """Rank 0: the plan, with its temporary directory created."""
    plan = plan_save(manifests, max_shard_size, save_id=uuid.uuid4().hex[:12], out=save_fs.target_path(out_dir),
                     world_size=world)
    save_fs.prepare(plan)
    return plan_to_json(plan)


class PeerLost(Exception):
    """A send or receive of this rank failed: the peer failed or died (not this rank's fault)."""


def _step(group: Group, phase: str, fn: Callable[[], Any], cleanup: Callable[[], None] | None = None) -> Any:
    """Run this rank's part of ``phase``. On failure (alone: the error itself) the error is
    posted for every rank, this rank's connections are closed so no peer waits on it, the
    temporary directory is removed, and LoadError is raised."""
    try:
        return fn()
    except BaseException as exc:
        if group.world_size == 1:
            if cleanup is not None:
                cleanup()
            raise
        watch = group.watch
        if isinstance(exc, PeerLost):  # waiting on a peer: this rank is not the one to blame
            watch.reached(phase)
            _drop(group)
            verdict = watch.lost(phase, exc.__cause__ or exc)
        else:
            verdict = watch.fail(phase, exc)
        _drop(group)
        if cleanup is not None:
            cleanup()
        raise _error(verdict) from exc


def _exchange(group: Group, phase: str, fn: Callable[[], Any], alone: Any,
              cleanup: Callable[[], None] | None = None) -> Any:
    """The collective that ends ``phase`` (``alone``: its result with one rank). If it fails
    (a peer failed, died or hung), every rank raises the one agreed LoadError."""
    if group.world_size == 1:
        return alone
    group.watch.reached(phase)
    try:
        return fn()
    except BaseException as exc:
        _drop(group)
        root = exc.__cause__ if isinstance(exc, LoadError) and exc.__cause__ is not None else exc
        verdict = group.watch.lost(phase, root)
        if cleanup is not None:
            cleanup()
        raise _error(verdict) from exc


def _commit(group: Group, plan: SavePlan) -> None:
    if group.rank == 0:
        save_fs.check_written(plan)
        save_fs.commit(plan, group.hook)


# ------------------------------------------------------------------ writing


def _write(group: Group, plan: SavePlan, local: Collected) -> None:
    """Every rank: send the slices others write, write the files this rank writes (receiving
    what it lacks), and on rank 0 the index and config; everything fsynced."""
    hook, me = group.hook, group.rank
    if me != 0:  # rank 0 holds it since it made it
        save_fs.hold(plan.tmp, strict=False)
    hook("planned", plan.tmp)
    pieces = defaultdict(list)
    for p in plan.pieces:
        pieces[p.name].append(p)
    specs = {s.name: s for s in plan.tensors}
    if me == 0:
        if plan.sharded:
            save_fs.write_json(os.path.join(plan.tmp, INDEX_NAME), plan.index())
        if local.config is not None:
            save_fs.write_json(os.path.join(plan.tmp, CONFIG_NAME), local.config)
    sends: list[tuple[Any, int]] = []  # (work, bytes copied for it), oldest first
    for f in plan.files:
        if f.writer != me:
            _drain(group, sends, SEND_WINDOW)
            sends += [_send(group, local.tensors[p.name], f.writer, p.tag)
                      for n in f.tensors for p in pieces[n] if p.src == me and _piece_bytes(specs[n], p)]
            continue
        tensors, recvs = {}, []
        for name in f.tensors:
            tensors[name] = _assemble(group, specs[name], pieces[name], local.tensors, recvs)
        for work, buf, dst in recvs:
            _wait(group, work)
            if dst is not None:
                dst.copy_(buf.view(dst.dtype).reshape(dst.shape))
        _write_file(os.path.join(plan.tmp, f.file), tensors)
        hook("wrote", f.file)
    _drain(group, sends, 0)
    hook("written", "")


def _drain(group: Group, sends: list, limit: int) -> None:
    """Wait for the oldest sends until at most ``limit`` copied bytes are in flight. Safe: every
    rank walks the files in plan order, so the sends of an earlier file always complete."""
    while sends and (limit == 0 or sum(n for _, n in sends) > limit):
        _wait(group, sends.pop(0)[0])


def _piece_bytes(spec, piece) -> int:
    if piece.dim is None:
        return spec.nbytes
    rows = spec.shape[piece.dim]
    return spec.nbytes // rows * (piece.stop - piece.start) if rows else 0


def _send(group: Group, tensor: torch.Tensor, dst: int, tag: int) -> tuple[Any, int]:
    """Post one send; returns (work, bytes copied to send it: 0 for a CPU contiguous tensor)."""
    data = tensor.detach().cpu().contiguous()
    copied = data.numel() * data.element_size() if data.data_ptr() != tensor.data_ptr() else 0
    try:
        return dist.isend(data.reshape(-1).view(torch.uint8), dst, group=group.pg, tag=tag), copied
    except Exception as exc:
        raise PeerLost(f"sending to rank {dst} failed") from exc


def _recv(group: Group, buf: torch.Tensor, src: int, tag: int):
    try:
        return dist.irecv(buf, src, group=group.pg, tag=tag)
    except Exception as exc:
        raise PeerLost(f"receiving from rank {src} failed") from exc


def _assemble(group: Group, spec, pieces: list, local: dict, recvs: list) -> torch.Tensor:
    """The full tensor ``spec`` names: this rank's own copy if it holds it whole, else a new
    tensor filled from its own slices and receives posted into ``recvs``."""
    if len(pieces) == 1 and pieces[0].dim is None and pieces[0].src == group.rank:
        return local[spec.name]
    full = torch.empty(spec.shape, dtype=torch_dtype(spec.dtype))
    for p in pieces:
        dst = full if p.dim is None else full.narrow(p.dim, p.start, p.stop - p.start)
        if p.src == group.rank:
            dst.copy_(local[spec.name])
        elif dst.numel():
            if dst.is_contiguous():
                buf, copy_to = dst.reshape(-1).view(torch.uint8), None
            else:
                buf, copy_to = torch.empty(dst.numel() * dst.element_size(), dtype=torch.uint8), dst
            recvs.append((_recv(group, buf, p.src, p.tag), buf, copy_to))
    return full


def _wait(group: Group, work) -> None:
    try:
        work.wait(timeout=timedelta(seconds=group.timeout))
    except Exception as exc:
        raise PeerLost("a transfer with another rank failed") from exc


def _write_file(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """One shard with ``safetensors`` (metadata ``format: pt`` as transformers writes), mode
    0644, fsynced. A view into a larger storage is copied (safetensors refuses shared memory)."""
    from safetensors.torch import save_file
    ready = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
            t = t.clone()
        ready[name] = t
    save_file(ready, path, metadata={"format": "pt"})
    save_fs.fsync_file(path)


# ------------------------------------------------------------------ failing together


def _error(verdict: dict) -> LoadError:
    """The LoadError every rank raises for one agreed verdict (see workers.save_liveness)."""
    phase = verdict["phase"]
    fix_tail = ("the target directory holds the previous checkpoint or the new one, complete" if phase == "commit"
                else "the target directory was not changed")
    if verdict["kind"] == "error":
        rank = verdict["rank"]
        return LoadError(f"The save failed during {phase} on rank {rank}",
                         where=f"rank {rank} on host {verdict['node']}",
                         got=f"{verdict['type']}: {verdict['msg'].rstrip('.')}",
                         fix=f"fix the cause on that rank and save again; {fix_tail}")
    ranks = verdict["ranks"]
    if ranks is None:
        who, how = "rank 0 (or the rendezvous store it serves)", "stopped responding"
    else:
        who = (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}") if ranks else "a rank"
        how = "stopped responding (process gone)" if verdict["dead"] else "did not finish in time (still running)"
    return LoadError(f"The save failed during {phase}: {who} {how}", where=f"the exchange ending {phase}",
                     expected="every rank to reach it within the timeout", got=verdict["cause"],
                     fix=f"check that process (killed, out of memory, stuck I/O); {fix_tail}")
