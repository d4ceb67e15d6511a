"""Materialization: a model skeleton on the meta device, filled with the loaded tensors.

The skeleton is built with ``accelerate.init_empty_weights(include_buffers=False)`` (parameters
on meta, non-persistent buffers such as rotary ``inv_freq`` computed for real, as
``from_pretrained`` computes them) and weight initialisation disabled; the received tensors are
assigned with ``load_state_dict(assign=True)`` (:func:`load_into`) or transformers' own loading
(:mod:`weightcast.workers.convert`). Loaded parameters are never initialised or allocated twice;
only parameters the checkpoint lacks are initialised, by :mod:`weightcast.workers.finish`
(replicate / auto). Not collective: each rank materializes its own part.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from weightcast.orchestrator.errors import ConfigError, ModelMismatchError
from weightcast.workers.convert import is_transformers_model, load_into_model
from weightcast.workers.loading_info import LoadingInfo, ignorable, keys_mismatch

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
}


def resolve_dtype(dtype: Any, config: dict | None) -> torch.dtype | None:
    """The dtype floating tensors are cast to (None: keep the checkpoint's).

    ``"auto"`` takes ``dtype`` (or the older ``torch_dtype``) from config.json when present.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
        return _DTYPE_NAMES.get(str(name).replace("torch.", "")) if name else None
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise ConfigError("Unknown dtype", where="dtype argument", expected=f"'auto' or one of {sorted(_DTYPE_NAMES)}",
                          got=repr(dtype), fix="pass dtype='auto', 'bfloat16', 'float16' or a torch.dtype")
    return _DTYPE_NAMES[key]


def cast_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype`` (a private copy only where the dtype changes)."""
    if dtype is None:
        return tensors
    return {k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in tensors.items()}


def _module_classes(base: type = torch.nn.Module) -> list[type]:
    out, stack = [], [base]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


@contextlib.contextmanager
def _no_reset_parameters():
    """Modules' ``reset_parameters`` made no-ops while the skeleton is built: parameters are on
    meta and about to be replaced, so initialising them is wasted work (and must never touch
    real memory)."""
    saved = []
    for cls in _module_classes():
        for name in ("reset_parameters", "_reset_parameters"):
            if name in cls.__dict__:
                saved.append((cls, name, cls.__dict__[name]))
                setattr(cls, name, lambda self, *a, **k: None)
    try:
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


@contextlib.contextmanager
def _no_init():
    """Weight initialisation disabled: transformers' own switch when available, and modules'
    ``reset_parameters``."""
    ctx = contextlib.nullcontext()
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
        ctx = no_init_weights()
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
            ctx = no_init_weights()
        except ImportError:
            pass
    with ctx, _no_reset_parameters():
        yield


def build_skeleton(model: Any, config: dict | None, trust_remote_code: bool = False, *, root: str | None = None,
                   source: str = "", overrides: dict | None = None,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model whose parameters are on the meta device: from ``"auto"`` (the transformers class
    config.json names), a transformers model class or auto class (with ``overrides``, the config
    overrides of ``from_pretrained``), a factory callable, or a module already on meta."""
    from accelerate import init_empty_weights
    from weightcast.workers.hf_model import instantiate, is_hf_class
    if isinstance(model, torch.nn.Module):
        return model
    if overrides and not (model == "auto" or is_hf_class(model)):
        raise ConfigError("Config overrides apply to transformers models only", where="load_pretrained(**kwargs)",
                          got=f"{sorted(overrides)} with model={model!r}"[:300],
                          fix="pass model='auto' or a transformers class, or drop the keyword arguments")
    with init_empty_weights(include_buffers=False), _no_init():
        if model == "auto" or is_hf_class(model):
            if not config:
                raise ConfigError("A transformers model needs a config.json in the checkpoint",
                                  where="checkpoint directory", fix="pass model=<factory> or model=None for a state dict")
            _need_transformers()
            return instantiate(model, config, root=root, source=source, overrides=overrides or {},
                               trust_remote_code=trust_remote_code, dtype=dtype)
        if callable(model):
            return model()
    raise ConfigError("Unknown model argument", where="load_pretrained(model=...)",
                      expected="'auto', a transformers (auto) class, a callable returning an nn.Module, "
                               "an nn.Module on meta, or None", got=repr(model))


def _need_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError("model='auto' needs transformers", fix="pip install 'weightcast[hf]'") from exc


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> LoadingInfo:
    """Assign ``tensors`` (named as the model names its parameters) into the meta skeleton.
    Returns the :class:`~weightcast.workers.loading_info.LoadingInfo` (missing / unexpected keys).
    Raises ModelMismatchError for a shape mismatch (from_pretrained raises too)."""
    expected = module.state_dict(keep_vars=True)
    for name, t in tensors.items():
        if name in expected and tuple(expected[name].shape) != tuple(t.shape):
            raise ModelMismatchError("A checkpoint tensor does not fit the model", where=f"tensor {name}",
                                     expected=f"shape {tuple(expected[name].shape)}", got=f"shape {tuple(t.shape)}",
                                     fix="check that the checkpoint and config.json belong together")
    result = module.load_state_dict(tensors, strict=False, assign=True)
    return LoadingInfo(missing_keys=set(result.missing_keys), unexpected_keys=set(result.unexpected_keys))


def assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor], *, strict: bool,
           device: torch.device, key_mapping: dict | None = None, progress: bool = False) -> torch.nn.Module:
    """Assign ``tensors`` into the meta skeleton, re-tie tied weights, check keys, move to
    ``device``. Raises ModelMismatchError for shape mismatches and (strict) missing or
    unexpected keys. A transformers model goes through transformers' own key mapping
    (:func:`weightcast.workers.convert.load_into_model`); the loading info is kept as
    ``module.loading_info``."""
    if is_transformers_model(module):
        return _assign_converted(module, tensors, strict=strict, device=device, key_mapping=key_mapping,
                                 progress=progress)
    info = load_into(module, tensors)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    check_keys(module, sorted(info.unexpected_keys), strict)
    if device.type != "cpu":
        module.to(device)
    module.eval()  # as from_pretrained returns it (dropout off)
    return module


def _assign_converted(module: torch.nn.Module, tensors: dict[str, torch.Tensor], *, strict: bool,
                      device: torch.device, key_mapping: dict | None, progress: bool) -> torch.nn.Module:
    info = load_into_model(module, tensors, key_mapping=key_mapping, progress=progress)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    check_keys(module, sorted(info.unexpected_keys), strict)
    module.loading_info = info
    if device.type != "cpu":
        module.to(device)
    module.eval()
    return module


def check_keys(module: torch.nn.Module, unexpected: list[str], strict: bool) -> None:
    """After a tensor-parallel, FSDP or plain assignment: no parameter may be left on meta (these
    paths do not initialise missing modules: refused even without ``strict``, never a model half
    on meta); with ``strict`` no checkpoint key may be unknown to the model either (saved
    non-persistent buffers excepted, as from_pretrained ignores them)."""
    missing = [k for k, v in module.state_dict(keep_vars=True).items() if v.is_meta]
    unexpected = [k for k in unexpected if not ignorable(module, k)]
    if missing or (strict and unexpected):
        raise keys_mismatch(missing, unexpected,
                            fix="use the matching config / model class, or pass strict=False with "
                                "device_map='replicate' or 'auto' (missing modules are initialised there)")


def guard_no_init(fn: Callable) -> Callable:
    """Decorator for tests and debugging: raise if ``fn`` runs on a non-meta tensor."""
    def wrapped(tensor, *args, **kwargs):
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
            raise AssertionError(f"{fn.__name__} ran on a real tensor of shape {tuple(tensor.shape)}")
        return fn(tensor, *args, **kwargs)
    return wrapped
