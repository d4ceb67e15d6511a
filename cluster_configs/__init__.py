"""Example cluster YAMLs shipped with weightcast: ``weightcast plan --cluster 16x8-h100`` finds them by name."""
from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped configurations, without the ``.yaml`` suffix."""
    return sorted(f[:-5] for f in os.listdir(DIR) if f.endswith(".yaml"))


def path(name: str) -> str | None:
    """The file of a shipped configuration named ``name`` (with or without ``.yaml``), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    candidate = os.path.join(DIR, stem + ".yaml")
    return candidate if os.path.sep not in stem and os.path.isfile(candidate) else None
