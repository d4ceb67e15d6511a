"""Checkpoint tensors -> model parameters, with transformers' own loading rules.

For a transformers model the mapping from checkpoint keys to parameters is transformers' own:
the model's conversion mapping (:func:`transformers.conversion_mapping.get_model_conversion_mapping`:
``WeightRenaming`` s, ``WeightConverter`` s that merge per-expert tensors into fused MoE parameters,
concatenate, chunk, transpose, permute; the ``legacy`` gamma/beta renames), a user ``key_mapping``
(regex -> replacement, as ``from_pretrained(key_mapping=...)``), and ``base_model_prefix`` added
or stripped (a ``BertModel`` save loaded into ``BertForSequenceClassification`` and back).

- :func:`map_checkpoint_keys` (rank 0, planning; not collective): every checkpoint key -> its target
  parameter and the converter pattern that claims it, computed with transformers'
  ``rename_source_key`` exactly as ``convert_and_load_state_dict_in_model`` calls it.
- :func:`load_into_model` (every rank, on what it holds; not collective): runs
  ``convert_and_load_state_dict_in_model`` on the tensors this rank holds and returns transformers'
  ``LoadStateDictInfo`` (missing / unexpected / mismatched keys, conversion errors), as
  ``from_pretrained`` computes it. A converter that concatenates makes one private copy of what the
  rank owns; renamed tensors stay views of the loaded (zero-copy) tensors.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch

from weightcast.orchestrator.errors import ConfigError, ModelMismatchError


def is_transformers_model(module: Any) -> bool:
    """True for a ``transformers.PreTrainedModel`` (whose keys follow transformers' mapping)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel)


def conversion_mapping(module: torch.nn.Module, key_mapping: Mapping[str, str] | None = None) -> list:
    """The model's ordered weight transforms, as ``from_pretrained`` builds them (a user
    ``key_mapping`` first, then the model's registered conversions, then the legacy renames)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    check_key_mapping(key_mapping)
    return get_model_conversion_mapping(module, dict(key_mapping) if key_mapping else None)


def check_key_mapping(key_mapping: Any) -> None:
    """Raise :class:`ConfigError` unless ``key_mapping`` is None or a ``{regex: replacement}`` dict
    of strings whose patterns compile."""
    import re
    if key_mapping is None:
        return
    if not isinstance(key_mapping, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in key_mapping.items()):
        raise ConfigError("key_mapping maps regular expressions to replacements", where="key_mapping",
                          expected='{"^old_prefix\\\\.": "new_prefix."}', got=repr(key_mapping)[:200],
                          fix="pass a dict of str -> str, as from_pretrained(key_mapping=...)")
    for pattern in key_mapping:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError("Invalid regular expression in key_mapping", where=f"key_mapping[{pattern!r}]",
                              got=str(exc), fix="fix the pattern") from None


def map_checkpoint_keys(module: torch.nn.Module, keys: list[str],
                        key_mapping: Mapping[str, str] | None = None) -> dict[str, tuple[str, str | None]]:
    """``{checkpoint key: (target name, converter source pattern or None)}`` for every key, with
    transformers' ``rename_source_key`` called as ``convert_and_load_state_dict_in_model`` calls it
    (a target absent from the model means the key is unexpected). ``module`` is on meta."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    transforms = conversion_mapping(module, key_mapping)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(module, "base_model_prefix", None)
    meta = module.state_dict()
    out: dict[str, tuple[str, str | None]] = {}
    for key in keys:
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        out[key] = (target, pattern)
    return out


def load_into_model(module: torch.nn.Module, tensors: dict[str, torch.Tensor], *,
                    key_mapping: Mapping[str, str] | None = None, dtype_plan: dict | None = None,
                    progress: bool = False, match_dtypes: bool = True,
                    ignore_mismatched_sizes: bool = False) -> Any:
    """Fill the meta skeleton ``module`` (a transformers model) with ``tensors`` (checkpoint names,
    the tensors this rank holds) through transformers' ``convert_and_load_state_dict_in_model``;
    returns its ``LoadStateDictInfo``. Tensors keep their dtype (cast before, as the caller
    decides); ``dtype_plan`` (``{pattern: dtype}``) overrides it per parameter as from_pretrained's
    does. Parameters nothing was loaded into stay on meta and are listed as missing.

    Called on every rank for its own tensors; not collective (a DTensor skeleton is sliced to its
    local shard by transformers' shard-on-read).
    """
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    mapping = conversion_mapping(module, key_mapping)
    if match_dtypes:
        match_meta_dtypes(module, tensors, map_checkpoint_keys(module, list(tensors), key_mapping))
    config = LoadStateDictConfig(dtype=None, dtype_plan=dict(dtype_plan or {}), weight_mapping=mapping)
    with _progress_bars(progress):
        info, _ = convert_and_load_state_dict_in_model(module, tensors, config)
    if not ignore_mismatched_sizes:
        raise_mismatched(info)
    if info.conversion_errors:
        name, error = next(iter(info.conversion_errors.items()))
        raise ModelMismatchError("transformers' weight conversion failed", where=f"parameter {name}",
                                 got=str(error)[:500], expected="checkpoint tensors the model's conversion accepts",
                                 fix="check that the checkpoint and config.json belong together")
    return info


def match_meta_dtypes(module: torch.nn.Module, tensors: Mapping[str, Any],
                       keys: dict[str, tuple[str, str | None]]) -> None:
    """Give each meta parameter the dtype of the checkpoint tensor(s) that make it, so transformers'
    loader keeps the tensors as they are (no cast, no copy) instead of casting to the skeleton's
    default dtype."""
    want: dict[str, torch.dtype] = {}
    for key, (target, _) in keys.items():
        if tensors[key].is_floating_point():
            want.setdefault(target, tensors[key].dtype)
    for name, param in list(module.named_parameters()):
        dtype = want.get(name)
        if dtype is None or not param.is_meta or not param.is_floating_point() or param.dtype == dtype:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = torch.nn.Parameter(torch.empty_like(param, dtype=dtype, device="meta"),
                                                     requires_grad=param.requires_grad)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own "Loading weights" bar only where the caller shows progress."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def raise_mismatched(info: Any) -> None:
    """A checkpoint tensor whose shape does not fit its parameter is an error (as from_pretrained
    raises without ``ignore_mismatched_sizes``)."""
    if info.mismatched_keys:
        name, got, want = sorted(info.mismatched_keys, key=str)[0]
        raise ModelMismatchError("A checkpoint tensor does not fit the model", where=f"parameter {name}",
                                 expected=f"shape {tuple(want)}", got=f"shape {tuple(got)}",
                                 fix="check that the checkpoint and config.json belong together (a new head "
                                     "size: pass ignore_mismatched_sizes=True to initialise it anew)")
