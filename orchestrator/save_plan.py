"""Plan a distributed save: which tensors go in which shard file, who writes each file, and
which slices travel to the writer. Pure: no torch, no I/O.

Who calls what: every rank of ``weightcast.workers.save.save_pretrained`` describes what it holds as a
list of :class:`Held` (its manifest); rank 0 calls :func:`plan_save` on all manifests and
broadcasts :func:`plan_to_json`; every rank decodes it with :func:`plan_from_json`.

Shard assignment is the one ``transformers``' ``save_pretrained`` uses
(``huggingface_hub.split_state_dict_into_shards_factory``: tensors in model order, a new file
when the next tensor would pass ``max_shard_size``, a tensor bigger than the limit alone in
its own file), so the same tensors in the same order give the same file names and weight map.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass

from weightcast.orchestrator.errors import ConfigError, PlanError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


@dataclass(frozen=True, slots=True)
class Held:
    """One tensor (or slice) a rank holds. ``shape`` is the full tensor's; for a slice,
    ``dim`` is set and the rank holds rows ``[start, stop)`` along it."""
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    itemsize: int
    shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.itemsize

    @property
    def held_bytes(self) -> int:
        if self.dim is None:
            return self.nbytes
        return self.nbytes // max(self.shape[self.dim], 1) * (self.stop - self.start)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What one rank holds, plus the save order it knows (``order`` may name tensors held by
    other ranks, e.g. a model's full state-dict order)."""
    rank: int
    held: tuple[Held, ...]
    order: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows ``[start, stop)`` along ``dim`` of tensor ``name`` (``dim`` None: all of it), sent
    by rank ``src`` to the writer of the tensor's file. ``tag`` is unique within the plan."""
    name: str
    src: int
    dim: int | None
    start: int
    stop: int
    tag: int


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class ShardFile:
    file: str
    writer: int
    tensors: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class SavePlan:
    """Everything every rank needs to write its files. ``tmp`` is the directory the files go
    to, ``out`` the final checkpoint directory, ``old`` where a previous checkpoint is parked
    while it is replaced (only when the atomic exchange is unavailable)."""
    save_id: str
    out: str
    tmp: str
    old: str
    files: tuple[ShardFile, ...]
    tensors: tuple[TensorSpec, ...]
    pieces: tuple[Piece, ...]
    total_size: int
    total_parameters: int

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    def weight_map(self) -> dict[str, str]:
        return {name: f.file for f in self.files for name in f.tensors}

    def index(self) -> dict:
        """The ``model.safetensors.index.json`` content (transformers' keys)."""
        return {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                "weight_map": self.weight_map()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parse_shard_size(value: int | str) -> int:
    """``max_shard_size`` as bytes: an int, or ``"5GB"`` / ``"100KB"`` (decimal units, as
    transformers and huggingface_hub read them)."""
    from huggingface_hub.serialization._base import parse_size_to_int
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError("max_shard_size must be an int or a size string", got=repr(value),
                          expected='bytes as an int, or a string like "5GB", "500MB"')
    try:
        size = value if isinstance(value, int) else parse_size_to_int(value)
    except ValueError as exc:
        raise ConfigError("max_shard_size is not a size", got=repr(value), expected='e.g. "5GB", "500MB", "100KB"',
                          fix=str(exc)) from None
    if size <= 0:
        raise ConfigError("max_shard_size must be positive", got=repr(value))
    return size


def natural_key(name: str) -> list[tuple]:
    """Sort key of state-dict names: dot-separated parts, numbers numerically (``layers.2`` before
    ``layers.10``, ``shard_2`` before ``shard_11``). Sorted this way is the order transformers'
    ``save_pretrained`` writes a model loaded with ``from_pretrained``."""
    parts: list[tuple] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        digits = part[len(text):]
        parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def merge_order(manifests: list[Manifest]) -> list[str]:
    """One order of every held tensor.

    When some rank gives an order hint (a model's full state-dict order, or ``order=``), the
    hints decide: they are merged (see :func:`_topo_merge`) and held names no hint lists follow
    in the ranks' own order. Without hints, the ranks' own orders are merged. With one rank
    knowing the full order, that order is the result.
    """
    ranked = sorted(manifests, key=lambda m: m.rank)
    held_seqs = [[h.name for h in m.held] for m in ranked]
    hints = [list(m.order) for m in ranked if m.order]
    merged = _topo_merge(hints) if hints else []
    listed = set(merged)
    rest = _topo_merge([[n for n in seq if n not in listed] for seq in held_seqs])
    held = {n for seq in held_seqs for n in seq}
    return [n for n in merged + rest if n in held]


def _topo_merge(seqs: list[list[str]]) -> list[str]:
    """The union of consecutive pairs of every sequence, sorted topologically; ties (and any
    contradiction between sequences) broken by (first sequence listing the name, position)."""
    prio: dict[str, tuple[int, int]] = {}
    succ: dict[str, set[str]] = {}
    indeg: dict[str, int] = {}
    for k, seq in enumerate(seqs):
        seq = list(dict.fromkeys(seq))
        for i, name in enumerate(seq):
            prio.setdefault(name, (k, i))
            succ.setdefault(name, set())
            indeg.setdefault(name, 0)
        for a, b in zip(seq, seq[1:]):
            if b not in succ[a]:
                succ[a].add(b)
                indeg[b] += 1
    ready = [(prio[n], n) for n, d in indeg.items() if d == 0]
    heapq.heapify(ready)
    out: list[str] = []
    done: set[str] = set()
    while len(done) < len(prio):
        if not ready:  # contradictory orders: take the highest-priority name left
            name = min((n for n in prio if n not in done), key=lambda n: prio[n])
        else:
            name = heapq.heappop(ready)[1]
            if name in done:
                continue
        done.add(name)
        out.append(name)
        for nxt in succ[name]:
            indeg[nxt] -= 1
            if indeg[nxt] == 0 and nxt not in done:
                heapq.heappush(ready, (prio[nxt], nxt))
    return out


def _holders(manifests: list[Manifest]) -> dict[str, list[tuple[int, Held]]]:
    """name -> [(rank, Held)] in rank order; dtype and full shape must agree across ranks."""
    out: dict[str, list[tuple[int, Held]]] = {}
    for m in sorted(manifests, key=lambda m: m.rank):
        for h in m.held:
            known = out.setdefault(h.name, [])
            if known and (known[0][1].dtype, tuple(known[0][1].shape)) != (h.dtype, tuple(h.shape)):
                r0, first = known[0]
                raise PlanError(f"Ranks disagree about tensor {h.name!r}", where=f"ranks {r0} and {m.rank}",
                                expected=f"{first.dtype} {list(first.shape)} (as on rank {r0})",
                                got=f"{h.dtype} {list(h.shape)} on rank {m.rank}",
                                fix="pass the same dtype and full shape for a tensor on every rank that holds it")
            known.append((m.rank, h))
    return out


def _check_cover(name: str, holders: list[tuple[int, Held]]) -> None:
    """A tensor no rank holds whole must be tiled exactly by its slices along one dim."""
    if any(h.dim is None for _, h in holders):
        return
    dims = {h.dim for _, h in holders}
    full = holders[0][1].shape
    if len(dims) != 1:
        raise PlanError(f"Slices of tensor {name!r} are cut along different dims", got=sorted(dims),
                        fix="shard a tensor along one dim on every rank")
    dim = dims.pop()
    spans = sorted({(h.start, h.stop) for _, h in holders})
    pos = 0
    for start, stop in spans:
        if start != pos:
            what = "overlap" if start < pos else "leave a gap"
            raise PlanError(f"Slices of tensor {name!r} {what} along dim {dim}", where=f"rows {pos} .. {start}",
                            expected=f"slices tiling rows 0 .. {full[dim]}", got=spans,
                            fix="pass slices that together hold every row exactly once (replicas must be identical)")
        pos = stop
    if pos != full[dim]:
        raise PlanError(f"Slices of tensor {name!r} do not reach the end of dim {dim}", expected=full[dim],
                        got=pos, fix="some rank must hold the last rows")


def _sources(name: str, holders: list[tuple[int, Held]], writer: int) -> list[tuple[int, Held]]:
    """Who provides each part of ``name`` to ``writer``: the writer itself where it can."""
    whole = [(r, h) for r, h in holders if h.dim is None]
    if whole:
        return [next(((r, h) for r, h in whole if r == writer), whole[0])]
    spans: dict[tuple[int, int], tuple[int, Held]] = {}
    for r, h in holders:
        if h.stop == h.start:  # an empty slice carries nothing
            continue
        key = (h.start, h.stop)
        if key not in spans or (r == writer and spans[key][0] != writer):
            spans[key] = (r, h)
    return [spans[k] for k in sorted(spans)]


def _assign_writers(groups: list[list[str]], holders: dict[str, list[tuple[int, Held]]],
                    world: int) -> list[int]:
    """Each file's writer: the rank holding most of its bytes; ties to the least loaded rank,
    then the lowest. Deterministic."""
    load = [0] * world
    writers = []
    for names in groups:
        local = [0] * world
        for name in names:
            for r, h in holders[name]:
                local[r] += h.held_bytes
        size = sum(holders[n][0][1].nbytes for n in names)
        best = min(range(world), key=lambda r: (-local[r], load[r], r))
        load[best] += size
        writers.append(best)
    return writers


def plan_save(manifests: list[Manifest], max_shard_size: int | str, *, save_id: str, out: str,
              world_size: int | None = None) -> SavePlan:
    """Rank 0: the plan for ``manifests`` (one per rank). Raises PlanError when ranks disagree
    about a tensor or slices do not tile it, ConfigError when there is nothing to save."""
    from huggingface_hub import split_state_dict_into_shards_factory
    limit = parse_shard_size(max_shard_size)
    holders = _holders(manifests)
    if not holders:
        raise ConfigError("Nothing to save: no rank holds any tensor", where=out,
                          fix="pass a state dict or a module with at least one tensor")
    for name, hs in holders.items():
        _check_cover(name, hs)
    order = merge_order(manifests)
    pattern = WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    split = split_state_dict_into_shards_factory({n: holders[n][0][1].nbytes for n in order},
                                                 get_storage_size=lambda n: n, max_shard_size=limit,
                                                 filename_pattern=pattern)
    groups = list(split.filename_to_tensors.items())
    world = world_size or (max(m.rank for m in manifests) + 1)
    writers = _assign_writers([names for _, names in groups], holders, world)
    files, pieces = [], []
    for (file, names), writer in zip(groups, writers):
        nbytes = sum(holders[n][0][1].nbytes for n in names)
        files.append(ShardFile(file, writer, tuple(names), nbytes))
        for name in names:
            for r, h in _sources(name, holders[name], writer):
                pieces.append(Piece(name, r, h.dim, h.start, h.stop, len(pieces)))
    specs = tuple(TensorSpec(n, holders[n][0][1].dtype, tuple(holders[n][0][1].shape), holders[n][0][1].nbytes)
                  for n in order)
    return SavePlan(save_id, out, f"{out}.tmp-{save_id}", f"{out}.old-{save_id}", tuple(files), specs,
                    tuple(pieces), int(split.metadata["total_size"]), sum(_numel(s.shape) for s in specs))


def manifest_to_json(m: Manifest) -> bytes:
    return json.dumps(asdict(m), separators=(",", ":")).encode()


def manifest_from_json(blob: bytes) -> Manifest:
    d = json.loads(blob)
    held = tuple(Held(h["name"], h["dtype"], h["itemsize"], tuple(h["shape"]), h["dim"], h["start"], h["stop"])
                 for h in d["held"])
    return Manifest(d["rank"], held, tuple(d["order"]))


def plan_to_json(plan: SavePlan) -> bytes:
    return json.dumps(asdict(plan), separators=(",", ":")).encode()


def plan_from_json(blob: bytes) -> SavePlan:
    d = json.loads(blob)
    files = tuple(ShardFile(f["file"], f["writer"], tuple(f["tensors"]), f["nbytes"]) for f in d["files"])
    specs = tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t["nbytes"]) for t in d["tensors"])
    pieces = tuple(Piece(**p) for p in d["pieces"])
    return SavePlan(d["save_id"], d["out"], d["tmp"], d["old"], files, specs, pieces, d["total_size"],
                    d["total_parameters"])
