"""The transformers side of a model skeleton: which class, which config, which dtypes.

``load_pretrained(model=...)`` takes ``"auto"`` (the class named by config.json's
``architectures``), a transformers model class (``LlamaForCausalLM``) or an auto class
(``AutoModelForSequenceClassification``), with ``from_pretrained``'s config overrides as keyword
arguments (``num_labels=3``). The config is built the way ``from_pretrained`` builds it
(``config_class.from_dict(config.json, **overrides)``; overrides the config does not know go to the
model's ``__init__``); remote code (``auto_map`` with ``trust_remote_code=True``) comes from the
checkpoint's own snapshot through transformers' dynamic module utilities. Not collective: every
rank builds its own skeleton from the same arguments.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any

import torch

from weightcast.orchestrator.errors import ConfigError, RemoteCodeRefusedError


def is_hf_class(model: Any) -> bool:
    """True for a transformers model class or auto class (``AutoModelFor...``)."""
    if not isinstance(model, type):
        return False
    try:
        from transformers import PreTrainedModel
        from transformers.models.auto.auto_factory import _BaseAutoModelClass
    except ImportError:
        return False
    return issubclass(model, (PreTrainedModel, _BaseAutoModelClass))


def _is_auto_class(model: Any) -> bool:
    from transformers.models.auto.auto_factory import _BaseAutoModelClass
    return isinstance(model, type) and issubclass(model, _BaseAutoModelClass)


def needs_remote_code(config: dict) -> bool:
    """Whether config.json's model can only be built from its ``auto_map`` code: its
    ``model_type`` is not one transformers knows."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


def hf_config(config: dict, root: str | None, overrides: dict, trust_remote_code: bool,
              model: Any = "auto") -> tuple[Any, dict]:
    """``(PretrainedConfig, model_kwargs)`` as ``from_pretrained`` builds them: config.json's values,
    then ``overrides`` set where the config has the attribute; the rest are returned for the model's
    ``__init__``. A model class brings its own ``config_class`` (as ``Cls.from_pretrained``); a
    custom config class (``auto_map``) is used only with ``trust_remote_code``."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    cfg = {k: v for k, v in config.items() if k not in ("transformers_version",)}
    own = getattr(model, "config_class", None) if isinstance(model, type) and not _is_auto_class(model) else None
    if own is not None and getattr(own, "model_type", None):
        return own.from_dict(cfg, return_unused_kwargs=True, **overrides)
    model_type = cfg.get("model_type")
    if not model_type:
        raise ConfigError("config.json has no model_type", where="config.json", fix="pass model=<factory>")
    remote = (cfg.get("auto_map") or {}).get("AutoConfig")
    if model_type not in CONFIG_MAPPING and not (remote and trust_remote_code):
        _refuse_remote(cfg, f"model_type {model_type!r} is not a transformers model type")
    if remote and trust_remote_code and root:
        return AutoConfig.from_pretrained(root, trust_remote_code=True, return_unused_kwargs=True,
                                          local_files_only=True, **overrides)
    config_class = CONFIG_MAPPING[model_type]
    return config_class.from_dict(cfg, return_unused_kwargs=True, **overrides)


def _refuse_remote(cfg: dict, why: str) -> None:
    if cfg.get("auto_map"):
        raise RemoteCodeRefusedError("config.json asks for remote code (auto_map)", where="config.json",
                                     got=f"auto_map={cfg['auto_map']!r}"[:300] + f"; {why}",
                                     fix="review that code and pass trust_remote_code=True, or pass model=<factory>")
    raise ConfigError("Unknown model type", where="config.json", got=why,
                      fix="upgrade transformers, or pass model=<factory>")


def model_class(model: Any, hf_cfg: Any, root: str | None, trust_remote_code: bool) -> type:
    """The class to instantiate for ``model`` (``"auto"``, a model class or an auto class), as
    ``from_pretrained`` picks it: ``"auto"`` is the architecture config.json names when transformers
    has it; an auto class takes the checkpoint's ``auto_map`` class with ``trust_remote_code=True``,
    else the library's class for the config (remote code refused where there is none)."""
    import transformers
    auto_map = getattr(hf_cfg, "auto_map", None) or {}
    if isinstance(model, type) and not _is_auto_class(model):
        return model
    if model == "auto":  # the class config.json names, as that class's from_pretrained would build it
        archs = getattr(hf_cfg, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is not None:
            return cls
        auto_name = _auto_name_for(auto_map, archs)
        model = getattr(transformers, auto_name, transformers.AutoModel)
    name = model.__name__
    if trust_remote_code and name in auto_map and root:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        return get_class_from_dynamic_module(auto_map[name], root, local_files_only=True)
    try:
        return model._model_mapping[type(hf_cfg)]
    except KeyError:
        if name in auto_map:
            _refuse_remote(hf_cfg.to_dict(), f"{name} has no library class for {type(hf_cfg).__name__}")
        raise ConfigError("The model class does not support this config", where=f"model={name}",
                          expected=f"a config {name} maps to", got=type(hf_cfg).__name__,
                          fix="pick the task class for this model type (e.g. AutoModelForCausalLM)") from None


def _auto_name_for(auto_map: dict, archs: list[str]) -> str:
    """The ``auto_map`` entry whose class is config.json's architecture, else the first model entry."""
    for auto_name, ref in auto_map.items():
        if auto_name.startswith("AutoModel") and archs and str(ref).rsplit(".", 1)[-1] == archs[0]:
            return auto_name
    for auto_name in auto_map:
        if auto_name.startswith("AutoModel"):
            return auto_name
    return "AutoModel"


def instantiate(model: Any, config: dict, *, root: str | None, source: str, overrides: dict,
                trust_remote_code: bool, dtype: torch.dtype | None) -> torch.nn.Module:
    """A transformers model with its parameters on meta and its weights untied (tying waits for
    the checkpoint, as in ``from_pretrained``); ``config.dtype`` and ``name_or_path`` set as
    ``from_pretrained`` sets them. Call inside the skeleton's no-init context."""
    hf_cfg, model_kwargs = hf_config(config, root, dict(overrides), trust_remote_code, model)
    if dtype is not None:
        hf_cfg.dtype = dtype
        for sub in getattr(hf_cfg, "sub_configs", {}) or {}:
            if getattr(hf_cfg, sub, None) is not None:
                getattr(hf_cfg, sub).dtype = dtype
    hf_cfg.name_or_path = source
    cls = model_class(model, hf_cfg, root, trust_remote_code)
    from transformers.initialization import no_tie_weights
    with no_tie_weights():
        module = cls(hf_cfg, **model_kwargs)
    module.name_or_path = source
    return module


def dtype_plan(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``{module name pattern: dtype}`` of what stays in fp32 (``_keep_in_fp32_modules`` with fp16,
    ``_keep_in_fp32_modules_strict`` with fp16 / bf16), from the model itself."""
    get = getattr(module, "_get_dtype_plan", None)
    if get is None or dtype is None:
        return {}
    return dict(get(dtype))


def dtype_for(name: str, dtype: torch.dtype | None, plan: dict[str, torch.dtype]) -> torch.dtype | None:
    """The dtype parameter ``name`` gets: the plan's where a pattern matches (as transformers
    matches them: a regex search in the name), else ``dtype``."""
    for pattern, want in plan.items():
        if re.search(pattern, name):
            return want
    return dtype


def cast_for_model(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None,
                   plan: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Floating tensors cast to their parameter's dtype (a copy only where the dtype changes)."""
    out = {}
    for name, t in tensors.items():
        want = dtype_for(name, dtype, plan) if t.is_floating_point() else None
        out[name] = t.to(want) if want is not None and t.dtype != want else t
    return out


def load_generation_config(module: torch.nn.Module, root: str | None) -> None:
    """``generation_config.json`` of the checkpoint into ``module.generation_config``, as
    ``from_pretrained`` loads it for models that can generate (absent file: the config's defaults)."""
    import os
    if not root or not hasattr(module, "can_generate") or not module.can_generate():
        return
    path = os.path.join(root, "generation_config.json")
    if not os.path.isfile(path):
        return
    from transformers import GenerationConfig
    with contextlib.suppress(OSError):  # from_pretrained keeps the config's defaults then
        module.generation_config = GenerationConfig.from_pretrained(root, local_files_only=True)
