"""Fuzzing with fixed budgets (``derandomize=True``: the same examples on every run, so CI is
stable): the index parser, the whole header + index + load path against ``safetensors``, and
the planner's reads against the files' data regions and the memory check.

Properties: bad input only ever raises a WeightcastError (never another exception, never a
hang); accepted weight-map names stay inside the checkpoint; whatever weightcast loads,
``safetensors.torch.load_file`` loads with the same bytes; every planned read lies inside a
file's data region; a plan is refused before reading exactly when a rank would own more
bytes than its memory.
"""
from __future__ import annotations

import json
import os
import struct

import ckpt_factory as cf  # sets HF_HUB_OFFLINE
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from weightcast.orchestrator import safetensors_format as sf
from weightcast.orchestrator.checkpoint import load_index
from weightcast.orchestrator.errors import DeviceMapError, UnsafePathError, WeightcastError
from weightcast.orchestrator.planner import plan_load, rank_owned_bytes
from tests.test_planner import planner_inputs

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

SHARDS = {n: f"model-0000{i}-of-00003.safetensors" for i, n in enumerate(["a", "b", "c"], start=1)}
_NAMES = st.one_of(st.sampled_from([*SHARDS.values(), "..", ".", "", "/etc/passwd", "../x.safetensors",
                                    "a/../../b", "sub/x", "C:\\x", "x\x00y", "model.safetensors.index.json"]),
                   st.text(max_size=12))
_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(allow_nan=False),
                       st.text(max_size=8))


def _json_values():
    return st.recursive(_JSON_LEAF, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.text(max_size=6), kids, max_size=3), max_leaves=8)


@settings(FUZZ, max_examples=200)
@given(st.dictionaries(st.text(max_size=10), st.one_of(_NAMES, _json_values()), max_size=6),
       st.one_of(st.none(), _json_values(), st.fixed_dictionaries({"total_size": _JSON_LEAF})),
       st.sampled_from(["obj", "raw", "list"]))
def test_index_parser_only_raises_weightcast_errors_and_names_stay_inside(weight_map, metadata, shape):
    doc = {"obj": {"weight_map": weight_map, "metadata": metadata}, "list": [weight_map],
           "raw": {"weight_map": weight_map}}[shape]
    raw = json.dumps(doc).encode()
    try:
        names, _ = sf.validate_index_json(raw, "model.safetensors.index.json")
    except WeightcastError as exc:
        assert "model.safetensors.index.json" in str(exc) or isinstance(exc, UnsafePathError), str(exc)
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    root = "/ckpt/root"
    for file in names.values():
        full = os.path.normpath(os.path.join(root, file))
        assert full.startswith(root + os.sep) and ".." not in file.split("/") and "\x00" not in file


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    cf.write_sharded(d, cf.sample_tensors(), shards=3)
    return {name: (d / name).read_bytes() for name in os.listdir(d)}


@settings(FUZZ, max_examples=60)
@given(st.data())
def test_index_with_real_shards_refuses_or_stays_consistent(shards, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("idx")
    for name, blob in shards.items():
        (d / name).write_bytes(blob)
    index = json.loads(shards["model.safetensors.index.json"])
    tensors = sorted(index["weight_map"])
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from([*tensors, "ghost"]))
        value = data.draw(st.one_of(st.sampled_from(sorted(SHARDS.values())), _NAMES, st.none()))
        if value is None:
            index["weight_map"].pop(key, None)
        else:
            index["weight_map"][key] = value
    if data.draw(st.booleans()):
        index["metadata"] = {"total_size": data.draw(st.integers(-1, 4000))}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        got = load_index(d)
    except WeightcastError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    sizes = {f.name: f.size for f in got.files}
    for t in got.tensors:
        assert "/" not in t.file and t.end <= sizes[t.file]
    assert sorted(t.name for t in got.tensors) == sorted(index["weight_map"])


_HEADER, _DATA_LEN = cf.header_for({"w": ("F32", [2, 3], 24), "b": ("BF16", [3], 6), "i": ("I64", [1], 8)},
                                   {"format": "pt"})
VALID = cf.raw_safetensors(_HEADER, bytes(range(_DATA_LEN)))


@settings(FUZZ, max_examples=40)
@given(st.lists(st.tuples(st.one_of(st.integers(len(VALID) - _DATA_LEN, len(VALID) - 1),
                                   st.integers(0, len(VALID) - 1)), st.integers(0, 255)), max_size=4),
       st.one_of(st.just(0), st.integers(-16, 16)), st.binary(max_size=8))
def test_what_weightcast_loads_safetensors_loads_identically(tmp_path_factory, flips, cut, tail):
    """Differential: mutate a small file anywhere (header or data), load it with
    load_pretrained: a WeightcastError, or exactly the tensors safetensors reads."""
    from weightcast.workers.api import load_pretrained
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    data = bytes(data[:len(data) + cut] if cut < 0 else data) + (tail if cut >= 0 else b"")
    d = tmp_path_factory.mktemp("diff")
    (d / "model.safetensors").write_bytes(data)
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR") if k in os.environ}
    try:
        got = load_pretrained(str(d), model=None, progress=False, transport="collective")
    except WeightcastError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    finally:
        os.environ.update(env)
    event("loaded")
    want = load_file(str(d / "model.safetensors"))  # must not fail on what weightcast accepted
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_valid_fixture_loads():
    header_len = struct.unpack("<Q", VALID[:8])[0]
    tensors, meta = sf.parse_header_bytes(VALID[8:8 + header_len], "v", data_size=len(VALID) - 8 - header_len)
    assert set(tensors) == {"w", "b", "i"} and meta == {"format": "pt"}


@settings(FUZZ, max_examples=60)
@given(planner_inputs(), st.integers(0, 400))
def test_planned_reads_stay_in_data_regions_and_memory_is_checked(inputs, memory):
    """Every read of any plan lies inside a file's data region; the pre-read memory check
    refuses a plan exactly when some rank would own more bytes than its memory."""
    from dataclasses import replace
    from weightcast.orchestrator.prepare import check_fits as _check_fits
    index, cluster, dm, options = inputs
    try:
        plan = plan_load(index, cluster, dm, options)
    except WeightcastError:
        event("no plan")
        return
    files = {f.name: f for f in index.files}
    for r in plan.reads:
        f = files[r.file]
        assert f.data_start <= r.offset and r.offset + r.length <= f.size, (r, f)
    small = replace(cluster, ranks=tuple(replace(rk, device_memory=memory or 1) for rk in cluster.ranks))
    owned = rank_owned_bytes(plan, {t.name: t.length for t in index.tensors})
    event("too big" if max(owned, default=0) > (memory or 1) else "fits")
    if max(owned, default=0) > (memory or 1):
        with pytest.raises(DeviceMapError, match="does not fit its memory"):
            _check_fits(plan, small, index)
    else:
        _check_fits(plan, small, index)
