"""Bad-input catalogue: every broken checkpoint raises the right WeightcastError naming the file.

Each case builds a broken checkpoint in a tmp dir and returns (path, error class, text the
message must contain). ``CASES`` is reused by tests/test_cli_inspect.py (exit status 2).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import ckpt_factory as cf
import pytest

from weightcast.orchestrator.checkpoint import load_index
from weightcast.orchestrator.errors import (CheckpointFormatError, CheckpointNotFoundError, PickleRefusedError,
                                 UnsafePathError, WeightcastError)
from weightcast.orchestrator.safetensors_format import DTYPE_BITS

Case = tuple[Path, type, str]
CASES: dict[str, Callable[[Path], Case]] = {}
NAME = "model.safetensors"


def case(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
    CASES[fn.__name__] = fn
    return fn


def _file(tmp: Path, header: dict | bytes, data: bytes = b"", **kw) -> Case:
    cf.write_raw(tmp / NAME, header, data, **kw)
    return tmp, CheckpointFormatError, NAME


def _tensor(tmp: Path, info: dict, data: bytes = b"") -> Case:
    return _file(tmp, {"__metadata__": {"format": "pt"}, "w": info}, data)


def _two(tmp: Path, first: list[int], second: list[int], data: int) -> Case:
    return _file(tmp, {"a": {"dtype": "F32", "shape": [2], "data_offsets": first},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": second}}, bytes(data))


def _sharded(tmp: Path) -> dict:
    cf.write_sharded(tmp, shards=3)
    return json.loads((tmp / "model.safetensors.index.json").read_text())


def _rewrite_index(tmp: Path, obj: dict) -> None:
    (tmp / "model.safetensors.index.json").write_text(json.dumps(obj))


# ------------------------------------------------------------------ header bytes

@case
def truncated_length(tmp):
    (tmp / NAME).write_bytes(b"\x10\x00\x00")
    return tmp, CheckpointFormatError, NAME


@case
def empty_file(tmp):
    (tmp / NAME).write_bytes(b"")
    return tmp, CheckpointFormatError, NAME


@case
def length_past_end_of_file(tmp):
    return _file(tmp, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), length=4096)


@case
def length_over_100mb(tmp):
    return _file(tmp, b"{}      ", length=100_000_001)


@case
def header_not_json(tmp):
    return _file(tmp, b"{this is not json}")


@case
def header_json_array(tmp):
    return _file(tmp, b"[1, 2, 3]")


@case
def header_leading_space(tmp):
    return _file(tmp, b'  {"__metadata__": {}}')


@case
def header_not_utf8(tmp):
    return _file(tmp, b'{"w\xff\xfe": 1}')


@case
def header_duplicate_tensor(tmp):
    return _file(tmp, b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                      b'"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00")


@case
def header_nan(tmp):
    return _file(tmp, b'{"w":{"dtype":"U8","shape":[NaN],"data_offsets":[0,1]}}', b"\x00")


# ------------------------------------------------------------------ tensor entries

@case
def unknown_dtype(tmp):
    return _tensor(tmp, {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}, bytes(2))


@case
def dtype_not_string(tmp):
    return _tensor(tmp, {"dtype": 16, "shape": [2], "data_offsets": [0, 4]}, bytes(4))


@case
def negative_shape(tmp):
    return _tensor(tmp, {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}, bytes(8))


@case
def float_shape(tmp):
    return _tensor(tmp, {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, bytes(8))


@case
def bool_shape(tmp):
    return _tensor(tmp, {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}, bytes(1))


@case
def huge_shape(tmp):
    return _tensor(tmp, {"dtype": "U8", "shape": [2**70], "data_offsets": [0, 2**70]}, bytes(1))


@case
def shape_not_list(tmp):
    return _tensor(tmp, {"dtype": "U8", "shape": "4", "data_offsets": [0, 4]}, bytes(4))


@case
def offsets_reversed(tmp):
    return _tensor(tmp, {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}, bytes(4))


@case
def offsets_three_values(tmp):
    return _tensor(tmp, {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 8]}, bytes(4))


@case
def length_not_numel_times_itemsize(tmp):
    return _tensor(tmp, {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, bytes(8))


@case
def missing_data_offsets(tmp):
    return _tensor(tmp, {"dtype": "F32", "shape": [2]}, bytes(8))


@case
def extra_key_in_tensor(tmp):
    return _tensor(tmp, {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "strides": [1]}, bytes(1))


@case
def tensor_entry_not_object(tmp):
    return _file(tmp, {"w": [0, 1]}, bytes(1))


@case
def sub_byte_misaligned(tmp):
    if "F4" not in DTYPE_BITS:
        pytest.skip("installed safetensors has no F4")
    return _tensor(tmp, {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}, bytes(2))


# ------------------------------------------------------------------ data region

@case
def overlapping_offsets(tmp):
    return _two(tmp, [0, 8], [4, 12], 12)


@case
def gap_between_tensors(tmp):
    return _two(tmp, [0, 8], [12, 20], 20)


@case
def data_not_starting_at_zero(tmp):
    return _tensor(tmp, {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, bytes(8))


@case
def offsets_past_end_of_file(tmp):
    return _two(tmp, [0, 8], [8, 16], 12)


@case
def trailing_bytes(tmp):
    return _two(tmp, [0, 8], [8, 16], 20)


@case
def size_mismatch_truncated_download(tmp):
    cf.write_single(tmp)
    path = tmp / NAME
    os.truncate(path, path.stat().st_size - 1)
    return tmp, CheckpointFormatError, NAME


# ------------------------------------------------------------------ metadata

@case
def metadata_non_string_value(tmp):
    return _file(tmp, {"__metadata__": {"format": "pt", "step": 100}})


@case
def metadata_not_object(tmp):
    return _file(tmp, {"__metadata__": ["format", "pt"]})


# ------------------------------------------------------------------ files and directories

@case
def fifo_instead_of_file(tmp):
    os.mkfifo(tmp / NAME)
    return tmp, CheckpointFormatError, NAME


@case
def empty_directory(tmp):
    return tmp, CheckpointNotFoundError, str(tmp)


@case
def missing_path(tmp):
    return tmp / "nowhere", CheckpointNotFoundError, "nowhere"


@case
def pickle_only_directory(tmp):
    (tmp / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    return tmp, PickleRefusedError, "pytorch_model.bin"


@case
def several_files_without_index(tmp):
    cf.write_single(tmp, name="a.safetensors")
    cf.write_single(tmp, name="b.safetensors")
    return tmp, CheckpointFormatError, "a.safetensors"


@case
def symlink_escaping_directory(tmp):
    outside = tmp / "outside"
    outside.mkdir()
    cf.write_single(outside)
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    os.symlink(outside / NAME, ckpt / NAME)
    return ckpt, UnsafePathError, NAME


@case
def dangling_symlink(tmp):
    os.symlink(tmp / "gone.safetensors", tmp / NAME)
    return tmp, CheckpointNotFoundError, NAME


# ------------------------------------------------------------------ index

@case
def index_points_to_missing_file(tmp):
    _sharded(tmp)
    os.remove(tmp / "model-00002-of-00003.safetensors")
    return tmp, CheckpointNotFoundError, "model-00002-of-00003.safetensors"


@case
def index_dotdot_name(tmp):
    obj = _sharded(tmp)
    obj["weight_map"]["positions"] = "../model-00003-of-00003.safetensors"
    _rewrite_index(tmp, obj)
    return tmp, UnsafePathError, "../model-00003-of-00003.safetensors"


@case
def index_absolute_name(tmp):
    obj = _sharded(tmp)
    obj["weight_map"]["positions"] = str(tmp / "model-00003-of-00003.safetensors")
    _rewrite_index(tmp, obj)
    return tmp, UnsafePathError, "model-00003-of-00003.safetensors"


@case
def index_shard_symlink_escaping(tmp):
    ckpt = tmp / "ckpt"
    _sharded(ckpt)
    outside = tmp / "elsewhere.safetensors"
    os.replace(ckpt / "model-00001-of-00003.safetensors", outside)
    os.symlink(outside, ckpt / "model-00001-of-00003.safetensors")
    return ckpt, UnsafePathError, "model-00001-of-00003.safetensors"


@case
def tensor_in_two_shards(tmp):
    from safetensors.torch import load_file
    _sharded(tmp)
    last = tmp / "model-00003-of-00003.safetensors"
    tensors = load_file(last)
    tensors["embed.weight"] = load_file(tmp / "model-00001-of-00003.safetensors")["embed.weight"]
    cf.write_single(tmp, tensors, name=last.name)
    return tmp, CheckpointFormatError, "files 'model-00001-of-00003.safetensors' and 'model-00003"


@case
def tensor_missing_from_its_shard(tmp):
    obj = _sharded(tmp)
    obj["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    _rewrite_index(tmp, obj)
    return tmp, CheckpointFormatError, "ghost.weight"


@case
def extra_tensor_not_in_index(tmp):
    obj = _sharded(tmp)
    del obj["weight_map"]["mask"]
    obj["metadata"] = {}
    _rewrite_index(tmp, obj)
    return tmp, CheckpointFormatError, "mask"


@case
def tensor_listed_under_wrong_shard(tmp):
    obj = _sharded(tmp)
    obj["weight_map"]["embed.weight"] = "model-00002-of-00003.safetensors"
    _rewrite_index(tmp, obj)
    return tmp, CheckpointFormatError, "model-00001-of-00003.safetensors"


@case
def negative_total_size(tmp):
    obj = _sharded(tmp)
    obj["metadata"]["total_size"] = -1
    _rewrite_index(tmp, obj)
    return tmp, CheckpointFormatError, "model.safetensors.index.json"


@case
def empty_index(tmp):
    _sharded(tmp)
    _rewrite_index(tmp, {"metadata": {}, "weight_map": {}})
    return tmp, CheckpointFormatError, "model.safetensors.index.json"


@case
def index_not_json(tmp):
    _sharded(tmp)
    (tmp / "model.safetensors.index.json").write_text('{"weight_map": {"a": "x.safetensors",}')
    return tmp, CheckpointFormatError, "model.safetensors.index.json"


@case
def index_value_not_string(tmp):
    obj = _sharded(tmp)
    obj["weight_map"]["mask"] = ["model-00001-of-00003.safetensors"]
    _rewrite_index(tmp, obj)
    return tmp, CheckpointFormatError, "model.safetensors.index.json"


@case
def index_duplicate_tensor(tmp):
    _sharded(tmp)
    (tmp / "model.safetensors.index.json").write_text(
        '{"weight_map": {"mask": "model-00001-of-00003.safetensors", '
        '"mask": "model-00002-of-00003.safetensors"}}')
    return tmp, CheckpointFormatError, "model.safetensors.index.json"


@case
def index_shard_is_garbage(tmp):
    _sharded(tmp)
    (tmp / "model-00002-of-00003.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    return tmp, CheckpointFormatError, "model-00002-of-00003.safetensors"


def check_case(name: str, tmp_path: Path) -> None:
    path, cls, needle = CASES[name](tmp_path)
    with pytest.raises(cls) as info:
        load_index(path)
    assert isinstance(info.value, WeightcastError)
    assert needle in str(info.value), str(info.value)
    assert "Fix:" in str(info.value) or cls is CheckpointFormatError, str(info.value)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tmp_path):
    check_case(name, tmp_path)


def test_wrong_total_size_is_only_a_warning(tmp_path: Path) -> None:
    """metadata.total_size is informational (from_pretrained loads such a checkpoint): a value
    that disagrees with the headers warns, and the index is built from the headers."""
    obj = _sharded(tmp_path)
    obj["metadata"]["total_size"] += 2
    _rewrite_index(tmp_path, obj)
    with pytest.warns(UserWarning, match="total_size"):
        index = load_index(tmp_path)
    assert index.total_bytes == obj["metadata"]["total_size"] - 2
