"""Tensor parallelism from the model's own plan: transformers' ``tp_plan`` / ``ep_plan``.

For a transformers model with a plan, ``device_map="tp"`` shards it as
``from_pretrained(distributed_config=DistributedConfig(tp_size=N, ep_size=N))`` does: same meshes,
same DTensor placements, same forward hooks (transformers' ``maybe_distribute_model``), experts
split over the group where the model has an ``ep_plan``.

- :func:`key_rules` (coordinator, planning; not collective): one
  :class:`weightcast.orchestrator.key_mapping.KeyRule` per checkpoint key, from the key's target
  parameter (transformers' key mapping) and that parameter's placement in the resolved plans, so
  each rank reads only its rows, columns or experts.
- :func:`materialize_hf_tp` (every rank; collective: builds the device meshes): the meta skeleton
  distributed by transformers, then filled by transformers' ``convert_and_load_state_dict_in_model``
  whose shard-on-read asks each :class:`HeldTensor` for the rank's slice in full-tensor
  coordinates; a slice the plan did not give this rank is an error, never a silent zero.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from weightcast.orchestrator.errors import ConfigError, ModelMismatchError
from weightcast.orchestrator.key_mapping import KeyRule
from weightcast.orchestrator.order import LoadOrder

MODEL_TP_PLAN = (("<model>", "transformers"),)  # ClusterDeviceMap.tp_plan of a map from the model's plan


def has_model_plan(module: Any) -> bool:
    """A transformers model whose class or config defines a tensor- or expert-parallel plan."""
    from weightcast.workers.convert import is_transformers_model
    return is_transformers_model(module) and bool(getattr(module, "tp_plan", None) or getattr(module, "ep_plan", None))


def distributed_config(module: Any, tp_size: int, world_size: int) -> Any:
    """transformers' ``DistributedConfig`` for ``tp_size``-way groups replicated over the world:
    experts split over the group when the model has an ``ep_plan``."""
    from transformers.distributed import DistributedConfig
    ep = tp_size if getattr(module, "ep_plan", None) else 1
    return DistributedConfig(tp_size=tp_size, ep_size=ep, dp_replicate_size=world_size // tp_size)


def _param_dim(style_name: str, name: str, ndim: int) -> int | None:
    """The dim transformers' style ``style_name`` shards parameter ``name`` along with one
    contiguous ``Shard``; None where it is replicated or split in a way read whole here
    (head-unit meshes, strided packed layouts)."""
    from transformers.distributed.expert_parallel import MoEParamShard
    from transformers.distributed.tensor_parallel import (ALL_PARALLEL_STYLES, ColwiseParallel, EmbeddingParallel,
                                                          PackedColwiseParallel, PackedRowwiseParallel,
                                                          RowwiseParallel, UnitColwiseParallel, UnitRowwiseParallel)
    style = ALL_PARALLEL_STYLES[style_name] if style_name in ALL_PARALLEL_STYLES else None
    if style is None or ndim == 0 or isinstance(style, (UnitColwiseParallel, UnitRowwiseParallel,
                                                        PackedColwiseParallel, PackedRowwiseParallel)):
        return None
    if isinstance(style, ColwiseParallel):
        return (ndim - 2) % ndim
    if isinstance(style, RowwiseParallel):
        return None if name.rpartition(".")[2] == "bias" else ndim - 1
    if isinstance(style, EmbeddingParallel):
        return style.shard_dim % ndim
    if isinstance(style, MoEParamShard) and style.shards_expert_dim:
        return getattr(style.placement, "dim", 0) % ndim
    return None


def key_rules(module: Any, shapes: Mapping[str, tuple[int, ...]], tp_size: int, world_size: int,
              key_mapping: Mapping[str, str] | None = None) -> dict[str, KeyRule]:
    """Coordinator: how each checkpoint tensor (``shapes``: name -> full shape) is split over a
    ``tp_size`` group, from the model's resolved plans and transformers' key mapping."""
    from transformers.core_model_loading import MergeModulelist, dot_natural_key
    from weightcast.workers.convert import conversion_mapping, map_checkpoint_keys
    tp_plan, ep_plan, _ = module._resolve_parallel_plans(distributed_config(module, tp_size, world_size))
    styles = {**tp_plan, **ep_plan}
    params = dict(module.named_parameters())
    dims = {n: _param_dim(styles[n], n, p.ndim) for n, p in params.items() if n in styles}
    converters = {p: c for c in conversion_mapping(module, key_mapping) if hasattr(c, "operations")
                  for p in c.source_patterns}
    mapped = map_checkpoint_keys(module, list(shapes), key_mapping)
    position: dict[tuple[str, str], int] = {}
    rules: dict[str, KeyRule] = {}
    for key in sorted(shapes, key=dot_natural_key):  # the order transformers collects converter inputs in
        target, pattern = mapped[key]
        dim = dims.get(target)
        if dim is None:
            continue
        if pattern is None:
            if len(shapes[key]) == params[target].ndim:
                rules[key] = KeyRule("shard", dim)
            continue
        ops = getattr(converters.get(pattern), "operations", [])
        if dim == 0 and ops and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0:
            index = position.get((target, pattern), 0)
            position[(target, pattern)] = index + 1
            rules[key] = KeyRule("expert", 0, index, params[target].shape[0])
    _check_experts(params, dims, styles, tp_size)
    return rules


def _check_experts(params: dict, dims: dict, styles: dict, tp_size: int) -> None:
    """Experts split over the group must divide evenly (transformers' expert parallelism refuses
    otherwise): refused here, before any byte is read."""
    from transformers.distributed.expert_parallel import MoEParamShard
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES
    for name, dim in dims.items():
        style = ALL_PARALLEL_STYLES[styles[name]] if styles[name] in ALL_PARALLEL_STYLES else None
        count = params[name].shape[0]
        if isinstance(style, MoEParamShard) and dim == 0 and count % tp_size:
            raise ConfigError("The experts do not split evenly over the tensor-parallel group",
                              where=f"parameter {name}", expected=f"a tp size dividing {count} experts",
                              got=f"tp size {tp_size}", fix="pass a tp_size that divides the number of experts, "
                              "or load with device_map='replicate' or 'auto'")


class HeldTensor:
    """What this rank holds of one checkpoint tensor, addressed in full-tensor coordinates as
    transformers' shard-on-read addresses a safetensors slice (``get_shape()``, ``[slices]``)."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, local: torch.Tensor | None,
                 dim: int | None = None, start: int = 0, stop: int = 0) -> None:
        self.name, self.full_shape, self.dtype, self.local = name, tuple(shape), dtype, local
        self.dim, self.start, self.stop = dim, start, stop

    def get_shape(self) -> list[int]:
        return list(self.full_shape)

    def get_dtype(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getitem__(self, index: Any) -> torch.Tensor:
        if index is Ellipsis:
            index = ()
        index = index if isinstance(index, tuple) else (index,)
        if self.local is None or any(not isinstance(s, slice) for s in index):
            self._refuse(index)
        local = []
        for d, size in enumerate(self.full_shape):
            start, stop, step = (index[d] if d < len(index) else slice(None)).indices(size)
            if d == self.dim:
                if step != 1 or start < self.start or stop > self.stop:
                    self._refuse(index)
                start, stop = start - self.start, stop - self.start
            local.append(slice(start, stop, step))
        return self.local[tuple(local)]

    def _refuse(self, index: Any) -> None:
        held = "nothing" if self.local is None else (
            "the whole tensor" if self.dim is None else f"rows [{self.start}, {self.stop}) of dim {self.dim}")
        raise ModelMismatchError("The model's tensor-parallel plan asks this rank for bytes the load plan did "
                                 "not give it", where=f"tensor {self.name}", expected=f"a slice of {held}",
                                 got=repr(index)[:200],
                                 fix="report this: the load plan and the model's tp plan disagree")


def held_tensors(tensors: dict[str, torch.Tensor], rows: Mapping[str, tuple[str, tuple[int, ...]]],
                 owned: tuple, dtype: torch.dtype | None) -> dict[str, HeldTensor]:
    """Every checkpoint tensor of the plan as a :class:`HeldTensor` (``rows``: name -> (dtype,
    full shape); ``owned``: this rank's ``Owned`` slices), holding nothing where the rank owns none."""
    from weightcast.workers.layout import torch_dtype
    slices = {o.name: o for o in owned}
    out = {}
    for name, (dtype_name, shape) in rows.items():
        o = slices.get(name)
        local = tensors.get(name)
        held_dtype = local.dtype if local is not None else torch_dtype(dtype_name)
        if local is None and dtype is not None and held_dtype.is_floating_point:
            held_dtype = dtype
        if o is None or o.dim is None:
            out[name] = HeldTensor(name, shape, held_dtype, local)
        else:
            out[name] = HeldTensor(name, shape, held_dtype, local, o.dim, o.start, o.stop)
    return out


def _skeleton(job: Any, config: dict | None, root: str | None, dtype: torch.dtype | None) -> torch.nn.Module:
    from weightcast.workers.materialize import build_skeleton
    return build_skeleton(job.model, config, job.trust_remote_code, root=root, source=job.source,
                          overrides=getattr(job, "model_kwargs", None) or {}, dtype=dtype)


def plan_rules(job: Any, src: Any, shapes: Mapping[str, tuple[int, ...]],
               cluster: Any) -> tuple[dict[str, KeyRule], int] | None:
    """Coordinator, ``device_map="tp"``: the key rules and group size of a transformers model with
    its own plan (None: no such plan, or groups of one; the project's name patterns apply)."""
    from weightcast.orchestrator.device_map_tp import choose_tp_size, tp_groups
    if job.model is None:
        return None
    module = _skeleton(job, src.config, src.root, None)
    tp_size = choose_tp_size(cluster, job.tp_size)
    if not has_model_plan(module) or tp_size == 1:
        return None
    consecutive = tuple(tuple(range(i, i + tp_size)) for i in range(0, cluster.world_size, tp_size))
    if tp_groups(cluster, tp_size) != consecutive:
        raise ConfigError("transformers' tensor-parallel meshes need consecutive ranks per group",
                          where="device_map='tp'", expected=f"groups {consecutive}",
                          got=f"groups {tp_groups(cluster, tp_size)}",
                          fix="number the ranks node by node (torchrun does), or pass tp_size")
    return key_rules(module, shapes, tp_size, cluster.world_size, job.key_mapping), tp_size


def materialize_hf_tp(job: Any, order: LoadOrder, tensors: dict[str, torch.Tensor], plan: Any, owned: tuple,
                      group: Any) -> torch.nn.Module:
    """Every rank (collective: transformers builds its device meshes): this rank's part of the
    model, distributed by transformers with the model's own plan and filled with what it holds."""
    from weightcast.orchestrator.planner import owned_table
    from weightcast.workers.convert import load_into_model, map_checkpoint_keys, match_meta_dtypes
    from weightcast.workers.hf_model import cast_for_model, dtype_plan
    from weightcast.workers.model_load import LOADING_INFO_ATTR, model_dtype
    tp_size = order.model_tp_size
    _check_world(tp_size, group.world_size)
    dtype = model_dtype(job.dtype, order)
    module = _skeleton(job, order.config, order.root, dtype)
    fp32 = dtype_plan(module, dtype)
    rows = {r.name: (r.dtype, tuple(r.shape)) for r in owned_table(plan).rows}
    held = held_tensors(cast_for_model(tensors, dtype, fp32), rows, owned, dtype)
    match_meta_dtypes(module, held, map_checkpoint_keys(module, list(held), job.key_mapping))
    cls = type(module)
    config, _, mesh_manager = cls.prepare_distribute_model(distributed_config(module, tp_size, group.world_size))
    module = cls.maybe_distribute_model(module, config, mesh_manager)
    info = load_into_model(module, held, key_mapping=job.key_mapping, dtype_plan=fp32, match_dtypes=False)
    # as from_pretrained finishes: a tied key the checkpoint lacks is tied, not missing
    module.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
    module._adjust_missing_and_unexpected_keys(info)
    _check_complete(module, info, job.strict)
    setattr(module, LOADING_INFO_ATTR, info)
    module.device_mesh = mesh_manager.get_mesh("tp")
    return module.eval()


def _check_complete(module: torch.nn.Module, info: Any, strict: bool) -> None:
    """``strict``: no missing or unexpected key; always: nothing left on meta (initialising a new
    head inside a tensor-parallel model is not done here: such a load is refused)."""
    from weightcast.workers.materialize import check_keys
    check_keys(module, sorted(info.unexpected_keys), strict)
    meta = [n for n, p in module.named_parameters() if p.is_meta]
    if meta:
        raise ModelMismatchError("The checkpoint leaves parameters of the tensor-parallel model unloaded",
                                 where=f"{len(meta)} parameters", got=", ".join(meta[:10]),
                                 expected="every parameter in the checkpoint (or tied)",
                                 fix="load this model with device_map='replicate' or 'auto' (missing modules "
                                     "are initialised there), or use a checkpoint that has them")


def _check_world(tp_size: int, world_size: int) -> None:
    if tp_size < 2 or world_size % tp_size:
        raise ConfigError("The tensor-parallel size does not divide the world", where="device_map='tp'",
                          expected=f"a tp size dividing {world_size}", got=str(tp_size), fix="pass another tp_size")
