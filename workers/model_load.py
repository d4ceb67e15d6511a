"""One rank's model from the tensors it received (every strategy but ``tp``).

Steps, as ``from_pretrained`` takes them: the dtype (``"auto"``: config.json's, else the
checkpoint's first floating tensor's, which rank 0 put in the order); the skeleton on meta (a
transformers class, auto class, ``"auto"``, a factory or a module); the dtype plan
(``_keep_in_fp32_modules``); the tensors cast and assigned; then :func:`finish_model` (missing
keys initialised, ties, the report). Not collective.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from weightcast.orchestrator.errors import ModelMismatchError
from weightcast.orchestrator.order import LoadOrder
from weightcast.workers.convert import is_transformers_model
from weightcast.workers.finish import FinishOptions, finish_model
from weightcast.workers.loading_info import LoadingInfo
from weightcast.workers.hf_model import cast_for_model, dtype_for, dtype_plan, load_generation_config
from weightcast.workers.materialize import build_skeleton, load_into, resolve_dtype

LOADING_INFO_ATTR = "_weightcast_loading_info"
IGNORE_MISMATCHED = "ignore_mismatched_sizes"  # from_pretrained's loading option, passed as a keyword


def model_dtype(dtype: Any, order: LoadOrder) -> torch.dtype | None:
    """The load's dtype: explicit, else (``"auto"``) config.json's, else the checkpoint's first
    floating dtype as ``from_pretrained`` derives it (None: keep each tensor's own)."""
    resolved = resolve_dtype(dtype, order.config)
    if resolved is None and dtype == "auto" and order.auto_dtype:
        resolved = getattr(torch, order.auto_dtype)
    return resolved


def materialize_model(job: Any, order: LoadOrder, tensors: dict[str, torch.Tensor], device: torch.device,
                      owns: Callable[[str], bool] | None = None, rank: int = 0) -> torch.nn.Module:
    """This rank's model filled with ``tensors`` (checkpoint names), finished as from_pretrained
    finishes it. The loading report rides on the module as ``_weightcast_loading_info`` until
    ``load_pretrained`` hands it out. ``owns(name)``: the missing keys this rank creates.
    Tensors the map puts on this rank's disk are dropped and offloaded (:mod:`workers.offload`)."""
    from weightcast.workers.offload import attach_offload, offload_targets, split_offloaded
    disk = order.disk or {}
    tensors, offloaded = split_offloaded(tensors, disk, rank)
    dtype = model_dtype(job.dtype, order)
    overrides = dict(getattr(job, "model_kwargs", None) or {})
    ignore_mismatched = bool(overrides.pop(IGNORE_MISMATCHED, False))
    module = build_skeleton(job.model, order.config, job.trust_remote_code,
                            root=order.root, source=job.source, overrides=overrides, dtype=dtype)
    check_kinds(module, tensors)
    plan = dtype_plan(module, dtype)
    targets = offload_targets(module, offloaded, getattr(job, "key_mapping", None))
    info = _fill(module, cast_for_model(tensors, dtype, plan), job, plan, ignore_mismatched)
    base_owns = owns or (lambda name: True)
    opts = FinishOptions(dtype_of=lambda name: dtype_for(name, dtype, plan) or torch.get_default_dtype(),
                         device=torch.device("cpu"), seed=order.init_seed, strict=job.strict,
                         owns=lambda name: name not in targets and base_owns(name))
    finish_model(module, info, opts)
    if is_transformers_model(module):
        load_generation_config(module, order.root)
    if device.type != "cpu":
        module.to(device)
    attach_offload(module, targets, order.root, {k: v[0] for k, v in disk.items()},
                   lambda name: dtype_for(name, dtype, plan), device)
    module.eval()  # as from_pretrained returns it (dropout off)
    setattr(module, LOADING_INFO_ATTR, info)
    return module


_FLOAT_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def first_float_dtype(index: Any) -> str | None:
    """Rank 0: the dtype ``from_pretrained(dtype="auto")`` takes when config.json names none: the
    index metadata's ``dtype``, else the first floating tensor (by name) of the first file."""
    named = index.metadata.get("dtype") if isinstance(index.metadata, Mapping) else None
    if isinstance(named, str):
        return named.replace("torch.", "")
    if not index.files:
        return None
    first = sorted((t for t in index.tensors if t.file == index.files[0].name), key=lambda t: t.name)
    for t in first:
        if t.dtype in _FLOAT_CODES:
            return _FLOAT_CODES[t.dtype]
    return None


def init_seed() -> int:
    """Rank 0: the seed every rank initialises missing parameters with, derived from rank 0's
    torch generator without advancing it (``torch.manual_seed`` before the load reproduces it; the
    caller's random stream is the same after the load as before)."""
    with torch.random.fork_rng(devices=[]):
        return int(torch.randint(0, 2**62, (1,)).item())


def owns_of(dm: Any, rank: int) -> Callable[[str], bool]:
    """For a model spread over ranks: whether ``rank`` holds parameter ``name``. A name the
    checkpoint lacks goes with its tied partner, else with its module's other tensors, else to the
    last rank holding weights (a new task head follows the last layers)."""
    placed = set(dm.placements)
    partner: dict[str, str] = {}
    for group in dm.tied:
        present = [n for n in group if n in placed]
        partner.update({n: present[0] for n in group if n not in placed and present})
    by_module: dict[str, str] = {}
    for n in sorted(placed):
        by_module.setdefault(n.rpartition(".")[0], n)
    last = max((r for n in placed for r in dm.owners(n)), default=0)

    def owns(name: str) -> bool:
        ref = name if name in placed else partner.get(name) or by_module.get(name.rpartition(".")[0])
        return rank in dm.owners(ref) if ref is not None else rank == last
    return owns


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], job: Any, plan: dict,
          ignore_mismatched: bool = False) -> Any:
    """The checkpoint's tensors into the skeleton: through transformers' own key mapping for a
    transformers model (:func:`weightcast.workers.convert.load_into_model`), by name otherwise.
    A tensor whose shape does not fit its parameter is refused, as from_pretrained refuses it,
    unless ``ignore_mismatched_sizes=True`` (the parameter is then initialised like a missing one
    and listed in ``mismatched_keys``)."""
    if not is_transformers_model(module):
        return load_into(module, tensors)
    from weightcast.workers.convert import load_into_model
    return load_into_model(module, tensors, key_mapping=getattr(job, "key_mapping", None), dtype_plan=plan,
                           progress=False, ignore_mismatched_sizes=ignore_mismatched)


def take_loading_info(model: Any) -> LoadingInfo | None:
    """The report :func:`materialize_model` left on the model, removed from it."""
    if isinstance(model, torch.nn.Module):
        return model.__dict__.pop(LOADING_INFO_ATTR, None)
    return None


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "floating point" if dtype.is_floating_point else "integer"


def check_kinds(module: torch.nn.Module, tensors: dict) -> None:
    """A checkpoint tensor must have the model's kind of dtype (floating point, integer, bool,
    complex): a cast between float widths is fine, an int8 weight for a float parameter is not."""
    expected = module.state_dict(keep_vars=True)
    for name, t in tensors.items():
        want = expected.get(name)
        if want is not None and _kind(want.dtype) != _kind(t.dtype):
            raise ModelMismatchError("A checkpoint tensor's dtype does not fit the model", where=f"tensor {name}",
                                     expected=f"a {_kind(want.dtype)} tensor (the model has {want.dtype})",
                                     got=f"{t.dtype}", fix="check that the checkpoint and the model belong together")
