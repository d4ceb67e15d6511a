"""What one rank holds for a save: its tensors (whole or slices), the manifest it tells rank 0,
the save order it knows and the config to write. Local, not collective; called by
``weightcast.workers.save.save_pretrained`` on every rank before the plan is made.

Tied tensors are saved once: for a ``transformers`` model by transformers' own rule (the
declared tied key is dropped, e.g. ``lm_head.weight`` under ``tie_word_embeddings``); for
anything else, a name whose tensor is the very same view as an earlier name's is dropped.
Tensors on the meta device are not held (another rank holds them, or nobody).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from weightcast.orchestrator.errors import ConfigError
from weightcast.orchestrator.save_plan import Held, Manifest


@dataclass
class Collected:
    """One rank's part of a save: ``tensors[name]`` is the whole tensor or the slice described
    by the matching :class:`Held` in ``manifest``."""
    tensors: dict[str, torch.Tensor]
    manifest: Manifest
    config: dict | None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError("Unknown dtype in the save plan", got=repr(name))
    return dtype


def collect(state: Any, rank: int, *, owned: Any = None, order: list[str] | None = None,
            config: dict | None = None) -> Collected:
    """This rank's tensors and manifest from a state dict or a module (see module doc).

    ``owned`` describes slices: an object with ``.slices`` {name: (dim, start, stop) | None}
    and ``.full_shapes`` {name: shape} (as ``OwnedTensors`` has), or a dict
    {name: (dim, start, stop, full_shape)}; without it, ``state``'s own ``.slices`` are used.
    """
    if isinstance(state, torch.nn.Module):
        tensors, known = _module_state(state)
        config = config if config is not None else module_config(state, tensors)
    elif isinstance(state, Mapping):
        tensors = _untie(dict(state))
        known = []  # a dict's own order is its held order (no hint about other ranks' tensors)
    else:
        raise ConfigError("save_pretrained needs a state dict or a torch.nn.Module", got=type(state).__name__,
                          fix="pass model.state_dict(), the dict load_pretrained returned, or the model")
    slices = _slices(owned if owned is not None else state)
    held, local = [], {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ConfigError("A state dict entry is not (str, Tensor)", where=f"entry {name!r}",
                              got=f"{type(name).__name__} -> {type(t).__name__}")
        if t.is_meta:
            continue
        t, sl = _dtensor_local(name, t, sl=slices.get(name))
        held.append(_held(name, t, sl))
        local[name] = t.detach()
    known = list(dict.fromkeys([*(order or []), *(n for n in known if n in tensors)]))  # the order hint
    return Collected(local, Manifest(rank, tuple(held), tuple(known)), _json_config(config))


def _module_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The module's state dict without tied duplicates, and its full key order."""
    sd = module.state_dict()
    if "transformers" in sys.modules and hasattr(module, "config"):
        from transformers import PreTrainedModel
        if isinstance(module, PreTrainedModel):
            sd = _transformers_state(module, sd)
            return sd, list(sd)
    sd = _untie(dict(sd))
    return sd, list(sd)


def _transformers_state(model: Any, sd: dict) -> dict:
    """What transformers' ``save_pretrained`` writes: tied keys dropped, the load-time weight
    conversions reverted (original names; a model from ``from_pretrained`` comes out in
    natural name order). Held by several ranks, a conversion that needs tensors this rank
    lacks is skipped (the names stay as the model has them)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    sd = remove_tied_weights_from_state_dict(dict(sd), model)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return sd
    try:
        return dict(revert_weight_conversion(model, sd))
    except Exception:
        if not any(isinstance(t, torch.Tensor) and t.is_meta for t in sd.values()):
            raise
        return sd


def _untie(sd: dict[str, Any]) -> dict[str, Any]:
    """Drop every name whose tensor is exactly the same view as an earlier name's."""
    seen: set[tuple] = set()
    out = {}
    for name, t in sd.items():
        if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() > 0 and type(t).__name__ != "DTensor":
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
        out[name] = t
    return out


def _slices(source: Any) -> dict[str, tuple[int, int, int, tuple[int, ...]]]:
    """{name: (dim, start, stop, full_shape)} for every sliced tensor ``source`` describes."""
    if source is None:
        return {}
    if hasattr(source, "slices") and hasattr(source, "full_shapes"):
        return {n: (s[0], s[1], s[2], tuple(source.full_shapes[n])) for n, s in source.slices.items() if s is not None}
    if isinstance(source, Mapping) and not isinstance(source, torch.nn.Module):
        out = {}
        for n, s in source.items():
            if isinstance(s, torch.Tensor):  # a plain state dict: no slices
                return {}
            if s is not None:
                if len(s) != 4:
                    raise ConfigError("owned entries must be (dim, start, stop, full_shape)", where=f"tensor {n!r}",
                                      got=repr(s))
                out[n] = (int(s[0]), int(s[1]), int(s[2]), tuple(int(x) for x in s[3]))
        return out
    return {}


def _dtensor_local(name: str, t: torch.Tensor, sl: tuple | None) -> tuple[torch.Tensor, tuple | None]:
    """A DTensor becomes its local shard plus the slice it covers (one sharded mesh dim at most)."""
    if type(t).__name__ != "DTensor":
        return t, sl
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shard_dims = [p.dim for p in t.placements if isinstance(p, Shard)]
    if len(shard_dims) > 1 or not all(p.is_replicate() or isinstance(p, Shard) for p in t.placements):
        raise ConfigError("Only DTensors replicated or sharded along one dim can be saved", where=f"tensor {name!r}",
                          got=str(t.placements), fix="redistribute the DTensor (or pass t.full_tensor())")
    local = t.to_local()
    if not shard_dims:
        return local, None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    d = shard_dims[0]
    return local, (d, offset[d], offset[d] + shape[d], tuple(t.shape))


def _held(name: str, t: torch.Tensor, sl: tuple | None) -> Held:
    """The manifest entry of one held tensor; a slice must match its declared rows."""
    dtype, size = dtype_name(t.dtype), t.element_size()
    if sl is None:
        return Held(name, dtype, size, tuple(t.shape))
    dim, start, stop, full = sl
    expect = list(full)
    if 0 <= dim < len(full):
        expect[dim] = stop - start
    if not (0 <= dim < len(full) and 0 <= start <= stop <= full[dim]) or list(t.shape) != expect:
        raise ConfigError(f"The slice of tensor {name!r} does not match its description", where=f"tensor {name!r}",
                          expected=f"rows [{start}, {stop}) along dim {dim} of a {list(full)} tensor, shape {expect}",
                          got=f"shape {list(t.shape)}", fix="pass slices as (dim, start, stop) of the full shape")
    return Held(name, dtype, size, tuple(full), dim, start, stop)


def module_config(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict | None:
    """A module's ``.config`` as a dict (``to_dict``), with ``architectures`` and ``dtype`` set
    as transformers' ``save_pretrained`` sets them."""
    cfg = getattr(module, "config", None)
    if cfg is None or not callable(getattr(cfg, "to_dict", None)):
        return None
    out = dict(cfg.to_dict())
    if hasattr(module, "can_generate"):  # a transformers model
        out["architectures"] = [type(module).__name__]
        floats = [t.dtype for t in tensors.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if floats:
            out["dtype"] = dtype_name(floats[0])
            out.pop("torch_dtype", None)
    return out


def _json_config(config: Any) -> dict | None:
    """``config`` as plain JSON data (torch dtypes as their names)."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        if callable(getattr(config, "to_dict", None)):
            config = config.to_dict()
        else:
            raise ConfigError("config must be a dict", got=type(config).__name__)

    def default(obj: Any) -> Any:
        if isinstance(obj, torch.dtype):
            return dtype_name(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")
    try:
        return json.loads(json.dumps(dict(config), default=default))
    except (TypeError, ValueError) as exc:
        raise ConfigError("config cannot be written as JSON", got=str(exc),
                          fix="pass a dict of JSON values (strings, numbers, lists, dicts)") from None
