"""After the checkpoint's tensors are in the skeleton: missing keys, ties, the loading report.

As ``from_pretrained`` finishes a load (``_finalize_model_loading``): every parameter the
checkpoint lacks (a new task head, an untied ``lm_head``) is moved off meta and initialised with
the model's own initialisation (transformers' ``_initialize_missing_keys``, which skips what was
loaded), tied weights are tied only where the checkpoint allows it (a trained ``lm_head`` that
differs from the embeddings stays untied, with transformers' warning), and the missing /
unexpected keys are adjusted by the model's ignore patterns. The random draws are seeded with a
seed rank 0 chose for the load, so every replica holds the same values. Models that are not
transformers models get their modules' ``reset_parameters``. A load never returns a parameter or
buffer it owns on meta. Not collective: each rank finishes its own model.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from weightcast.orchestrator.errors import LoadError, ModelMismatchError
from weightcast.workers.convert import is_transformers_model
from weightcast.workers.loading_info import LoadingInfo, ignorable, keys_mismatch

log = logging.getLogger("weightcast")


@dataclass
class FinishOptions:
    """How one rank finishes its model: ``dtype_of(name)`` for a new parameter, the rank's
    ``device``, the load's ``seed``, ``strict``, and ``owns(name)``: whether a missing key is
    this rank's to create (every key for a whole model; one rank's part under ``"auto"``)."""
    dtype_of: Callable[[str], torch.dtype | None]
    device: torch.device
    seed: int
    strict: bool = True
    owns: Callable[[str], bool] = lambda name: True


def finish_model(module: torch.nn.Module, info: LoadingInfo, opts: FinishOptions) -> LoadingInfo:
    """Every rank, after assigning the checkpoint's tensors: initialise what is missing, tie,
    adjust the report, refuse with ``strict``, and check nothing this rank owns is on meta.
    Keys another rank holds (a model spread over ranks) are not this rank's missing keys."""
    info.missing_keys = {k for k in info.missing_keys if opts.owns(k)}
    _mark_loaded(module, info)
    if is_transformers_model(module):
        _finish_transformers(module, info, opts)
    else:
        _finish_plain(module, info, opts)
    if opts.strict:
        check_strict(info)
    assert_no_meta(module, opts.owns)
    return info


def _mark_loaded(module: torch.nn.Module, info: LoadingInfo) -> None:
    """Flag what the checkpoint filled (transformers' init skips flagged tensors)."""
    missing = info.missing_and_mismatched()
    for name, t in module.state_dict(keep_vars=True).items():
        if name not in missing and not t.is_meta:
            t._is_hf_initialized = True


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Draws inside come from ``seed`` (on every rank alike); the caller's RNG state is restored."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _finish_transformers(module: torch.nn.Module, info: LoadingInfo, opts: FinishOptions) -> None:
    module.mark_tied_weights_as_initialized(info)
    tied_targets = set(getattr(module, "all_tied_weights_keys", {}) or {})
    moved = _materialize_missing(module, info.missing_and_mismatched() - tied_targets, opts)
    if moved:
        with seeded(opts.seed, opts.device):
            module._initialize_missing_keys(False)
    module.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
    module._adjust_missing_and_unexpected_keys(info)


def _materialize_missing(module: torch.nn.Module, names: set[str], opts: FinishOptions) -> list[str]:
    """Every missing key this rank owns that is still on meta gets an uninitialised tensor of its
    dtype on the rank's device (the model's init fills it next)."""
    moved = []
    for name in sorted(names):
        if not opts.owns(name):
            continue
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        old = getattr(sub, leaf, None)
        if not isinstance(old, torch.Tensor) or not old.is_meta:
            continue
        new = torch.empty(old.shape, dtype=opts.dtype_of(name) or old.dtype, device=opts.device)
        if leaf in sub._parameters:
            sub._parameters[leaf] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            sub._buffers[leaf] = new
        moved.append(name)
    return moved


def _finish_plain(module: torch.nn.Module, info: LoadingInfo, opts: FinishOptions) -> None:
    """A model that is not a transformers model: missing parameters get their module's
    ``reset_parameters`` (the loaded parameters of that module are kept), seeded."""
    info.unexpected_keys = {k for k in info.unexpected_keys if not ignorable(module, k)}
    if opts.strict and info.missing_keys:
        return  # refused by check_strict: nothing to initialise
    by_module: dict[str, list[str]] = {}
    for name in sorted(info.missing_keys):
        if opts.owns(name):
            owner, _, leaf = name.rpartition(".")
            by_module.setdefault(owner, []).append(leaf)
    with seeded(opts.seed, opts.device):
        for owner, leaves in by_module.items():
            _reset_missing(module, owner, leaves, opts)


def _reset_missing(module: torch.nn.Module, owner: str, leaves: list[str], opts: FinishOptions) -> None:
    sub = module.get_submodule(owner) if owner else module
    reset = getattr(sub, "reset_parameters", None)
    if reset is None:
        raise ModelMismatchError("A parameter the checkpoint lacks cannot be initialised",
                                 where=f"{owner or type(module).__name__}: {leaves}",
                                 expected="a module with reset_parameters() (or a transformers model)",
                                 got=type(sub).__name__, fix="load a checkpoint that holds these tensors")
    names = [f"{owner}.{leaf}" if owner else leaf for leaf in leaves]
    _materialize_missing(module, set(names), opts)
    kept = {n: p for n, p in sub._parameters.items() if n not in leaves and p is not None}
    for n, p in kept.items():  # reset writes into stand-ins, never into the loaded tensors
        sub._parameters[n] = torch.nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
    reset()
    sub._parameters.update(kept)


def check_strict(info: LoadingInfo) -> None:
    """``strict=True``: the checkpoint must fill the model exactly (after ties and the model's
    ignore patterns; mismatched shapes were refused before, unless ``ignore_mismatched_sizes``)."""
    if info.missing_keys or info.unexpected_keys:
        raise keys_mismatch(sorted(info.missing_keys), sorted(info.unexpected_keys),
                            fix="use the matching config / model class, or pass strict=False "
                                "(missing modules are then initialised as from_pretrained does)")


def assert_no_meta(module: torch.nn.Module, owns: Callable[[str], bool]) -> None:
    """A load never returns a parameter or buffer it owns on meta."""
    left = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta and owns(n)]
    left += [n for n, b in module.named_buffers() if b.is_meta and owns(n) and n not in left]
    if left:
        raise LoadError("The load left tensors of the model on the meta device", where=f"{left[:10]}",
                        expected="every parameter and buffer of this rank's part materialized",
                        fix="report this as a bug, with the checkpoint's config.json")


def report(info: LoadingInfo, model_name: str, source: str) -> None:
    """Rank 0 without ``output_loading_info``: one warning naming what was missing / unexpected,
    as from_pretrained's load report."""
    if not (info.missing_keys or info.unexpected_keys or info.mismatched_keys):
        return
    parts = []
    if info.unexpected_keys:
        parts.append(f"unexpected (dropped): {_short(info.unexpected_keys)}")
    if info.missing_keys:
        parts.append(f"missing (newly initialised): {_short(info.missing_keys)}")
    if info.mismatched_keys:
        parts.append(f"mismatched: {_short({k[0] for k in info.mismatched_keys})}")
    log.warning("%s load report from %s: %s", model_name, source, "; ".join(parts))


def _short(keys: set[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    return ", ".join(keys[:8]) + more
