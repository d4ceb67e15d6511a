"""``save_pretrained``: write a model held by one or many ranks as a transformers-style
checkpoint, atomically.

Collective over the default ``torch.distributed`` group when one is initialised (every rank
calls it, each passing what it holds), single-process otherwise. Steps, each ending in a
status exchange on a gloo group with the call's ``timeout``, so that a failure (or a dead rank)
anywhere becomes the same :class:`LoadError` everywhere:

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

import json
import os
import socket
import time
import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from orchestrator.errors import LoadError
from orchestrator.save_plan import (CONFIG_NAME, INDEX_NAME, SavePlan, manifest_from_json, manifest_to_json,
                                    plan_from_json, plan_save, plan_to_json)
from workers import save_fs
from workers.coordinator import Group, all_gather_bytes, broadcast_bytes
from workers.save_collect import Collected, collect, torch_dtype

Hook = Callable[[str, str], None]
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
    :func:`workers.save_collect.collect`; DTensors too) are gathered so files hold full
    tensors. ``order`` optionally names the tensor order of the files (default: each rank's
    own order, merged). ``out_dir`` is replaced atomically if it exists; its non-weight files
    (tokenizer, ...) are kept. Files get mode 0644, directories 0755. Any failure on any rank
    raises LoadError on every rank within ``timeout`` seconds and leaves ``out_dir`` as it was.
    """
    group = _open_group(timeout)
    _CALLS[0] += 1
    group.extra.update(call=_CALLS[0], hook=_fault_hook or (lambda event, detail: None))
    try:
        _save(group, state, os.fspath(out_dir), max_shard_size, config, owned, order)
    finally:
        if group.pg is not None:
            dist.destroy_process_group(group.pg)


def _open_group(timeout: float) -> Group:
    node = os.environ.get("WEIGHTCAST_NODE") or socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Group(0, 1, 0, 1, node, timeout=timeout)
    pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    return Group(rank, world, rank, world, node, pg, pg, timeout)


def _save(group: Group, state: Any, out_dir: str, max_shard_size: int | str, config: dict | None,
          owned: Any, order: list[str] | None) -> None:
    hook = group.extra["hook"]
    local = _collect_all(group, state, owned, order, config)
    manifests = local[1]
    hook("collected", "")
    plan = _plan(group, manifests, max_shard_size, out_dir)
    cleanup = lambda: save_fs.cleanup(plan, f"r{group.rank}")  # noqa: E731
    _phase(group, "write", lambda: _write(group, plan, local[0]), cleanup)
    _phase(group, "commit", lambda: _commit(group, plan), cleanup)


def _collect_all(group: Group, state: Any, owned: Any, order: list[str] | None,
                 config: dict | None) -> tuple[Collected, list]:
    """Every rank: collect locally, gather every manifest (or error) (collective)."""
    try:
        mine = collect(state, group.rank, owned=owned, order=order, config=config)
        blob = b"M" + manifest_to_json(mine.manifest)
    except BaseException as exc:
        if group.world_size == 1:
            raise
        mine, blob = None, b"E" + _error_blob(group, exc)
    blobs = _gather(group, "collect", blob)
    _raise_failed(group, "collect", [b[1:] if b[:1] == b"E" else b"" for b in blobs])
    return mine, [manifest_from_json(b[1:]) for b in blobs]


def _plan(group: Group, manifests: list, max_shard_size: int | str, out_dir: str) -> SavePlan:
    """Rank 0 plans and creates the temporary directory; everyone gets the plan (collective)."""
    blob = b""
    if group.rank == 0:
        try:
            save_id = uuid.uuid4().hex[:12]
            plan = plan_save(manifests, max_shard_size, save_id=save_id, out=save_fs.target_path(out_dir),
                             world_size=group.world_size)
            save_fs.prepare(plan)
            blob = b"P" + plan_to_json(plan)
        except BaseException as exc:
            if group.world_size == 1:
                raise
            blob = b"E" + _error_blob(group, exc)
    if group.world_size > 1:
        _mark(group, "plan")
        try:
            blob = broadcast_bytes(group, blob)
        except Exception as exc:
            raise _lost(group, "plan", exc) from exc
    if blob[:1] == b"E":
        _raise_failed(group, "plan", [blob[1:]])
    return plan_from_json(blob[1:])


def _phase(group: Group, name: str, fn: Callable[[], None], cleanup: Callable[[], None]) -> None:
    """Run one step on this rank, then exchange status; on any failure every rank cleans up
    and raises (collective)."""
    error = None
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - reported to every rank
        if group.world_size == 1:
            cleanup()
            raise
        error = exc
    try:
        reports = _gather(group, name, b"" if error is None else _error_blob(group, error))
        _raise_failed(group, name, reports, error)
    except BaseException:
        cleanup()
        raise


def _commit(group: Group, plan: SavePlan) -> None:
    if group.rank == 0:
        save_fs.check_written(plan)
        save_fs.commit(plan, group.extra["hook"])


# ------------------------------------------------------------------ writing


def _write(group: Group, plan: SavePlan, local: Collected) -> None:
    """Every rank: send the slices others write, write the files this rank writes (receiving
    what it lacks), and on rank 0 the index and config; everything fsynced."""
    hook, me = group.extra["hook"], group.rank
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
    sends = []
    for f in plan.files:
        if f.writer != me:
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
    for work in sends:
        _wait(group, work)
    hook("written", "")


def _piece_bytes(spec, piece) -> int:
    if piece.dim is None:
        return spec.nbytes
    rows = spec.shape[piece.dim]
    return spec.nbytes // rows * (piece.stop - piece.start) if rows else 0


def _send(group: Group, tensor: torch.Tensor, dst: int, tag: int):
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return dist.isend(data, dst, group=group.pg, tag=tag)


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
            recvs.append((dist.irecv(buf, p.src, group=group.pg, tag=p.tag), buf, copy_to))
    return full


def _wait(group: Group, work) -> None:
    work.wait(timeout=timedelta(seconds=group.timeout))


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


def _error_blob(group: Group, exc: BaseException) -> bytes:
    return json.dumps({"node": group.node, "type": type(exc).__name__, "msg": str(exc)}).encode()


def _raise_failed(group: Group, phase: str, reports: list[bytes], error: BaseException | None = None) -> None:
    """Raise LoadError naming the first rank whose report is an error (reports in rank order;
    a single report is rank 0's)."""
    failed = [(r, json.loads(b)) for r, b in enumerate(reports) if b]
    if not failed:
        return
    rank, info = failed[0]
    others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
    raise LoadError(f"The save failed during {phase} on rank {rank}{others}",
                    where=f"rank {rank} on host {info['node']}", got=f"{info['type']}: {info['msg']}",
                    fix="fix the cause on that rank and save again; the target directory was not changed"
                    if phase != "commit" else "fix the cause and save again; the target directory holds "
                    "the previous checkpoint or the new one, complete") from error


def _gather(group: Group, phase: str, blob: bytes) -> list[bytes]:
    """All-gather one status blob; a rank that does not answer becomes a LoadError naming it."""
    if group.world_size == 1:
        return [blob]
    _mark(group, phase)
    try:
        return all_gather_bytes(group, blob)
    except Exception as exc:
        raise _lost(group, phase, exc) from exc


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    except Exception:  # noqa: BLE001 - naming the lost rank is best effort
        return None


def _key(group: Group, phase: str, rank: int) -> str:
    return f"weightcast/save/{group.extra['call']}/{phase}/{rank}"


def _mark(group: Group, phase: str) -> None:
    """Tell the rendezvous store this rank reached the status exchange of ``phase``."""
    store = _store()
    try:
        if store is not None:
            store.set(_key(group, phase, group.rank), group.node)
    except Exception:  # noqa: BLE001 - best effort
        pass


def _lost(group: Group, phase: str, exc: Exception) -> LoadError:
    """The error for a collective that failed because a rank died or hung: names the ranks that
    never reached this exchange (from the rendezvous store, when it answers)."""
    missing = _missing_ranks(group, phase)
    who = (f"rank {missing[0]}" if len(missing) == 1 else f"ranks {missing}") if missing else "another rank"
    return LoadError(f"The save failed during {phase}: {who} stopped responding",
                     where=f"seen by rank {group.rank} on host {group.node}",
                     expected=f"every rank to reach the end of {phase} within {group.timeout:g} s",
                     got=f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                     fix="check that process (killed, out of memory, stuck I/O); the target directory was not "
                         "changed" if phase != "commit" else "check that process; the target directory holds the "
                         "previous checkpoint or the new one, complete")


def _missing_ranks(group: Group, phase: str, wait: float = 2.0) -> list[int]:
    store = _store()
    if store is None:
        return []
    deadline = time.monotonic() + wait
    missing = list(range(group.world_size))
    try:
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([_key(group, phase, r)])]
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store itself is gone: it lived in rank 0's process
        return [0] if group.rank != 0 else []
    return missing
