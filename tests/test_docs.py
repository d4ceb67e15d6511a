"""The README, DESIGN.md, BENCHMARKS.md and examples/ teach the public surface: ``import
weightcast as wc`` and ``wc.NAME`` for every name of ``weightcast.__all__``, never the sub-module
that defines it, and never the repository's folders as top-level packages."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import weightcast

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", REPO / "DESIGN.md", REPO / "BENCHMARKS.md",
               *(REPO / "examples").glob("*.py"), *(REPO / "examples").glob("*.sh")])
TOP_LEVEL = re.compile(r"^\s*(?:from|import)\s+(orchestrator|workers|launch)\b|-m\s+(orchestrator|workers|launch)\.",
                       re.MULTILINE)
SUBMODULE_IMPORT = re.compile(r"from\s+weightcast\.[\w.]+\s+import\s+([\w, ()]+)")
SUBMODULE_PATH = re.compile(r"weightcast\.(?:orchestrator|workers|launch)\.[\w.]*?\.(\w+)\b")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_public_names_are_used_through_wc(path):
    text = path.read_text()
    public = set(weightcast.__all__)
    assert not TOP_LEVEL.findall(text), f"{path.name}: the folders install as weightcast.*"
    for names in SUBMODULE_IMPORT.findall(text):
        direct = public & {n.strip(" ()") for n in names.split(",")}
        assert not direct, f"{path.name}: import {sorted(direct)} as wc.NAME"
    direct = public & set(SUBMODULE_PATH.findall(text))
    assert not direct, f"{path.name}: write wc.{sorted(direct)[0]}"


def test_examples_import_weightcast_as_wc():
    for path in (REPO / "examples").glob("*.py"):
        text = path.read_text()
        if "load_pretrained" in text or "load_on_ray" in text:
            assert re.search(r"^import weightcast as wc\b", text, re.MULTILINE), path.name
