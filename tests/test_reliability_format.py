"""Untrusted headers the parser refuses before planning: names that are not valid UTF-8 (lone
surrogate escapes) and more tensors than ``MAX_TENSORS`` (a header near the format's 100 MB limit
would cost minutes of planning: see BENCHMARKS.md)."""
from __future__ import annotations

import json
import time

import pytest

from weightcast.orchestrator import safetensors_format as sf
from weightcast.orchestrator.checkpoint import load_index
from weightcast.orchestrator.errors import CheckpointFormatError
from tests.ckpt_factory import write_index, write_raw
from benchmarks.header_cost import write_header_file


def _entry(i: int) -> dict:
    return {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}


@pytest.mark.parametrize("header", [
    b'{"w\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"w\\uDFFFx":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"__metadata__":{"k\\udbff":"v"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"__metadata__":{"k":"\\ud834"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
])
def test_lone_surrogate_names_are_refused(tmp_path, header: bytes) -> None:
    path = write_raw(tmp_path / "model.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointFormatError, match="not valid UTF-8") as info:
        load_index(tmp_path)
    assert "model.safetensors" in str(info.value) and "Fix:" in str(info.value)
    assert path


def test_surrogate_pairs_and_escaped_backslashes_are_fine(tmp_path) -> None:
    write_raw(tmp_path / "model.safetensors",
              b'{"w\\ud83d\\ude00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
              b'"x\\\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8)
    assert [t.name for t in load_index(tmp_path).tensors] == ["w\U0001F600", "x\\ud800"]


def test_lone_surrogate_in_an_index_is_refused(tmp_path) -> None:
    write_raw(tmp_path / "a.safetensors", {"w": _entry(0)}, b"\0" * 4)
    (tmp_path / "model.safetensors.index.json").write_bytes(b'{"weight_map":{"w\\ud800":"a.safetensors"}}')
    with pytest.raises(CheckpointFormatError, match="not valid UTF-8"):
        load_index(tmp_path)


def test_too_many_tensors_refused_before_parsing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sf, "MAX_TENSORS", 1000)
    write_raw(tmp_path / "model.safetensors", {f"t{i}": _entry(i) for i in range(1001)}, b"\0" * 4004)
    with pytest.raises(CheckpointFormatError, match="more tensors than weightcast plans") as info:
        load_index(tmp_path)
    assert "1,001 tensors" in str(info.value) and "MAX_TENSORS" in str(info.value)
    monkeypatch.setattr(sf, "MAX_TENSORS", 1001)
    assert len(load_index(tmp_path).tensors) == 1001


def test_too_many_tensors_in_an_index_refused_before_any_header(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sf, "MAX_TENSORS", 10)
    write_index(tmp_path, {f"t{i}": "missing.safetensors" for i in range(11)})
    with pytest.raises(CheckpointFormatError, match="more tensors than weightcast plans"):
        load_index(tmp_path)  # the shard does not exist: no header was read


def test_huge_header_refused_fast(tmp_path, record_property) -> None:
    """A 46 MB header of 450k tensors (over the default limit) is refused in well under the
    seconds parsing and planning it would cost."""
    size = write_header_file(str(tmp_path / "model.safetensors"), sf.MAX_TENSORS + 50_000)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match="more tensors than weightcast plans"):
        load_index(tmp_path)
    seconds = time.perf_counter() - t0
    record_property("refusal_s", round(seconds, 3))
    print(f"\n{size / 1e6:.0f} MB header refused in {seconds:.3f} s")
    assert seconds < 3.0
