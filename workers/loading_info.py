"""The loading report (missing / unexpected keys) shared by materialization and finishing.

:class:`LoadingInfo` is what ``from_pretrained(output_loading_info=True)`` reports;
:func:`ignorable` says which unexpected checkpoint keys from_pretrained ignores; and
:func:`keys_mismatch` is the error a load raises when the checkpoint does not fill the model.
Used by :mod:`weightcast.workers.materialize` and :mod:`weightcast.workers.finish` (which do not
import each other). Not collective.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from weightcast.orchestrator.errors import ModelMismatchError


@dataclass
class LoadingInfo:
    """What ``from_pretrained(output_loading_info=True)`` reports, with its field names."""
    missing_keys: set[str] = field(default_factory=set)
    unexpected_keys: set[str] = field(default_factory=set)
    mismatched_keys: set[tuple] = field(default_factory=set)
    error_msgs: list[str] = field(default_factory=list)
    conversion_errors: dict[str, str] = field(default_factory=dict)
    skipped_pp_keys: set[str] = field(default_factory=set)

    def missing_and_mismatched(self) -> set[str]:
        return self.missing_keys | {k[0] for k in self.mismatched_keys}

    def to_dict(self) -> dict:
        """The dict ``from_pretrained(output_loading_info=True)`` returns."""
        return {"missing_keys": set(self.missing_keys), "unexpected_keys": set(self.unexpected_keys),
                "mismatched_keys": set(self.mismatched_keys), "error_msgs": list(self.error_msgs)}


def ignorable(module: torch.nn.Module, key: str) -> bool:
    """A checkpoint key the model does not load, as from_pretrained ignores it: a non-persistent
    buffer the model computes itself (e.g. BERT's ``position_ids`` saved by older versions), or
    a name matching the class's ``_keys_to_ignore_on_load_unexpected`` patterns."""
    if key in dict(module.named_buffers()):
        return True
    patterns = getattr(module, "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(p, key) for p in patterns)


def keys_mismatch(missing: list[str], unexpected: list[str], fix: str) -> ModelMismatchError:
    """The error for a checkpoint that does not fill the model (the first ten keys of each kind)."""
    return ModelMismatchError("The checkpoint does not match the model",
                              where=f"{len(missing)} missing, {len(unexpected)} unexpected keys",
                              expected=f"no missing keys (missing: {missing[:10]})",
                              got=f"unexpected keys: {unexpected[:10]}", fix=fix)
