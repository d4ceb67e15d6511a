"""Small pieces the CLI subcommands share: the ``--storage-option KEY=VALUE`` option and its
parsing, and byte counts for people. Imported by ``weightcast.launch.cmd_*`` (which do not import
each other for these). Not collective; runs in the CLI process only.
"""
from __future__ import annotations

import argparse

from weightcast.orchestrator.errors import ConfigError


def add_storage_option(p: argparse.ArgumentParser, help: str) -> None:
    """``--storage-option KEY=VALUE`` (repeatable), read by :func:`parse_storage_options`."""
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help=help)


def parse_storage_options(items: list[str] | None) -> dict | None:
    """``["KEY=VALUE", ...]`` -> a storage_options dict (integers and floats converted)."""
    if not items:
        return None
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("A --storage-option is not KEY=VALUE", got=repr(item), fix="e.g. --storage-option "
                              "endpoint_url=http://127.0.0.1:8333")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def human_bytes(n: int) -> str:
    """1234567 -> '1.23 MB' (decimal units, as the hub shows sizes)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover
