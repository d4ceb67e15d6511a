"""The safetensors format layer: golden bytes, real writers, index building, property tests."""
from __future__ import annotations

import json
import os
import struct
import tempfile

import ckpt_factory as cf  # sets HF_HUB_OFFLINE before any hub import
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save

from weightcast.orchestrator import safetensors_format as sf
from weightcast.orchestrator.checkpoint import CheckpointIndex, FileEntry, TensorEntry, load_index
from weightcast.orchestrator.errors import CheckpointFormatError, WeightcastError

# A safetensors file written by hand: three tensors, dtype-aligned order (I64, F32, BF16), header
# padded with spaces to a multiple of 8.
GOLDEN_HEADER = (b'{"__metadata__":{"format":"pt"},'
                 b'"c":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},'
                 b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},'
                 b'"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[16,20]}}   ')
GOLDEN_DATA = (b"\x07\x00\x00\x00\x00\x00\x00\x00"      # c = [7]
               b"\x00\x00\xc0\x3f\x00\x00\x00\x40"      # a = [1.5, 2.0]
               b"\x80\x3f\x00\xc0")                     # b = [[1.0, -2.0]]
GOLDEN = struct.pack("<Q", 200) + GOLDEN_HEADER + GOLDEN_DATA


def golden_tensors() -> dict[str, torch.Tensor]:
    return {"b": torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16),
            "a": torch.tensor([1.5, 2.0]), "c": torch.tensor([7], dtype=torch.int64)}


def assert_matches_file(index: CheckpointIndex, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Every entry's bytes [offset, offset+length) equal safetensors' own tensor, bit for bit."""
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for t in index.tensors:
        if t.file not in by_file:
            by_file[t.file] = load_file(os.path.join(index.root, t.file))
        ref = by_file[t.file][t.name]
        assert sf.torch_dtype(t.dtype) == ref.dtype
        assert t.shape == tuple(ref.shape)
        with open(os.path.join(index.root, t.file), "rb") as f:
            f.seek(t.offset)
            raw = f.read(t.length)
        expected = ref.reshape(-1).view(torch.uint8).numpy().tobytes() if ref.numel() else b""
        assert raw == expected
        if tensors is not None:
            assert torch.equal(ref, tensors[t.name])
    names = [n for ts in by_file.values() for n in ts]
    assert sorted(names) == sorted(index.names)


def test_golden_bytes_equal_safetensors_serializer():
    assert len(GOLDEN_HEADER) == 200 and len(GOLDEN_HEADER) % 8 == 0
    assert save(golden_tensors(), metadata={"format": "pt"}) == GOLDEN


def test_golden_bytes_parse_to_exact_index(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(GOLDEN)
    index = load_index(tmp_path)
    st_ = os.stat(path)
    assert index.root == str(tmp_path)
    assert index.files == (FileEntry("model.safetensors", len(GOLDEN), st_.st_mtime_ns, 208,
                                     {"format": "pt"}),)
    assert index.tensors == (
        TensorEntry("c", "model.safetensors", "I64", (1,), 208, 8),
        TensorEntry("a", "model.safetensors", "F32", (2,), 216, 8),
        TensorEntry("b", "model.safetensors", "BF16", (1, 2), 224, 4),
    )
    assert index.total_bytes == 20 and dict(index.metadata) == {}
    assert_matches_file(index, golden_tensors())


def test_read_header_returns_relative_offsets(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(GOLDEN)
    header_len, tensors, meta = sf.read_header(tmp_path / "x.safetensors", "x.safetensors")
    assert header_len == 200 and meta == {"format": "pt"}
    assert tensors["b"] == sf.HeaderTensor("BF16", (1, 2), 16, 20)


def test_save_file_mixed_dtypes(tmp_path):
    tensors = cf.sample_tensors()
    cf.write_single(tmp_path, tensors)
    index = load_index(tmp_path)
    assert len(index.tensors) == len(tensors)
    assert index.tensor("scale").shape == () and index.tensor("empty").length == 0
    offsets = [t.offset for t in index.tensors]
    assert offsets == sorted(offsets)
    assert_matches_file(index, tensors)


def test_single_file_path_and_index_path(tmp_path):
    path = cf.write_single(tmp_path, name="weights.safetensors")
    by_file = load_index(path)
    by_dir = load_index(tmp_path)  # exactly one *.safetensors
    assert by_file == by_dir and by_file.files[0].name == "weights.safetensors"
    sharded = tmp_path / "sharded"
    cf.write_sharded(sharded)
    assert load_index(sharded / "model.safetensors.index.json") == load_index(sharded)


def test_sharded_dir_with_index(tmp_path):
    tensors = cf.sample_tensors()
    weight_map = cf.write_sharded(tmp_path, tensors, shards=3)
    index = load_index(tmp_path)
    assert [f.name for f in index.files] == sorted(set(weight_map.values()))
    assert {t.name: t.file for t in index.tensors} == weight_map
    assert index.metadata["total_size"] == index.total_bytes
    keys = [(t.file, t.offset) for t in index.tensors]
    assert keys == sorted(keys)
    assert_matches_file(index, tensors)


def test_model_safetensors_preferred_over_index(tmp_path):
    cf.write_sharded(tmp_path, shards=2)
    cf.write_single(tmp_path, {"only": torch.ones(3)})
    index = load_index(tmp_path)
    assert index.names == ("only",)


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_sharded_llama(tmp_path, tied):
    model = cf.save_tiny_llama(tmp_path, tied=tied, max_shard_size="100KB")
    index = load_index(tmp_path)
    state = model.state_dict()
    expected = set(state) - ({"lm_head.weight"} if tied else set())
    assert set(index.names) == expected
    assert len(index.files) > 1 and index.metadata["total_size"] == index.total_bytes
    assert index.files[0].metadata["format"] == "pt"
    assert_matches_file(index, {k: state[k] for k in expected})


def test_transformers_single_file_bert(tmp_path):
    model = cf.save_tiny_bert(tmp_path)
    index = load_index(tmp_path)
    assert [f.name for f in index.files] == ["model.safetensors"] and dict(index.metadata) == {}
    assert_matches_file(index, model.state_dict())


def test_hf_snapshot_with_blob_symlinks(tmp_path):
    src = tmp_path / "src"
    cf.write_sharded(src, shards=2)
    snapshot = cf.build_hf_cache(tmp_path / "cache", "acme/tiny", cf.dir_files(src))
    assert os.path.islink(os.path.join(snapshot, "model.safetensors.index.json"))
    index = load_index(snapshot)
    plain = load_index(src)
    assert index.tensors == plain.tensors and index.root == snapshot
    assert_matches_file(index, cf.sample_tensors())


def test_dtype_tables():
    for code, bits in {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "I16": 16,
                       "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
                       "F64": 64, "I64": 64, "U64": 64}.items():
        assert sf.DTYPE_BITS[code] == bits
        assert sf.dtype_itemsize_bytes(code) == bits // 8
        assert sf.torch_dtype(code).itemsize == bits // 8
    if "F4" in sf.DTYPE_BITS:  # safetensors >= 0.6 knows sub-byte floats
        assert sf.DTYPE_BITS["F4"] == 4 and sf.DTYPE_BITS["F6_E2M3"] == 6
        assert sf.tensor_nbytes("F4", (3, 2)) == 3
        with pytest.raises(CheckpointFormatError):
            sf.dtype_itemsize_bytes("F4")
        with pytest.raises(CheckpointFormatError):
            sf.tensor_nbytes("F4", (3,))
    with pytest.raises(CheckpointFormatError):
        sf.dtype_itemsize_bytes("Q4")


def test_sub_byte_dtype_file(tmp_path):
    if "F4" not in sf.DTYPE_BITS:
        pytest.skip("installed safetensors has no F4")
    header, size = cf.header_for({"w": ("F4", [4, 2], 4), "s": ("F8_E8M0", [4], 4)})
    cf.write_raw(tmp_path / "model.safetensors", header, bytes(size))
    index = load_index(tmp_path)
    assert index.tensor("w").length == 4 and index.tensor("s").offset == index.files[0].data_start + 4


def test_zero_length_tensors_share_an_offset(tmp_path):
    header, size = cf.header_for({"e1": ("F32", [0], 0), "w": ("F16", [2], 4), "e2": ("I8", [3, 0], 0)})
    cf.write_raw(tmp_path / "model.safetensors", header, bytes(size))
    index = load_index(tmp_path)
    assert [t.name for t in index.tensors] == ["e1", "w", "e2"]


def test_reads_only_the_header(tmp_path, monkeypatch):
    cf.write_single(tmp_path)
    calls: list[tuple[int, int]] = []
    real = os.pread

    def spy(fd, n, offset):
        calls.append((n, offset))
        return real(fd, n, offset)

    monkeypatch.setattr(sf.os, "pread", spy)
    index = load_index(tmp_path)
    assert calls == [(8, 0), (index.files[0].data_start - 8, 8)]


def test_index_metadata_total_size_float_accepted(tmp_path):
    cf.write_sharded(tmp_path, shards=2)
    path = tmp_path / "model.safetensors.index.json"
    obj = json.loads(path.read_text())
    obj["metadata"]["total_size"] = float(obj["metadata"]["total_size"])
    path.write_text(json.dumps(obj))
    assert load_index(tmp_path).metadata["total_size"] == obj["metadata"]["total_size"]


# ------------------------------------------------------------------ property tests

def _valid_file() -> bytes:
    return save(cf.sample_tensors(), metadata={"format": "pt", "note": "x"})


VALID = _valid_file()
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                     | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=8)


def _reads_past_header(data: bytes) -> list[tuple[int, int]]:
    """Parse ``data`` as a file (any error must be a WeightcastError naming the file); return
    the reads that went past 8 + the declared length (none is allowed)."""
    declared = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    limit = 8 + (declared if declared <= sf.MAX_HEADER_BYTES else 0)
    real = os.pread
    reads: list[tuple[int, int]] = []

    def spy(fd, n, offset):
        reads.append((n, offset))
        return real(fd, n, offset)

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        sf.os.pread = spy
        try:
            sf.read_header(f.name, "mutant.safetensors")
        except WeightcastError as exc:
            assert "mutant.safetensors" in str(exc)
        finally:
            sf.os.pread = real
    return [(n, offset) for n, offset in reads if offset + n > limit]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)), st.binary(max_size=16))
def test_byte_mutations_only_raise_weightcast_errors(flips, cut, tail):
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    assert _reads_past_header(bytes(data[:cut]) + tail) == []


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(cf.sample_tensors())), st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
       _JSON, st.integers(-64, 64))
def test_field_mutations_only_raise_weightcast_errors(name, key, value, length_delta):
    header_len = int.from_bytes(VALID[:8], "little")
    header = json.loads(VALID[8:8 + header_len])
    header[name][key] = value
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    declared = max(0, len(body) + length_delta)
    data = struct.pack("<Q", declared) + body + VALID[8 + header_len:]
    assert _reads_past_header(data) == []


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=4), st.fixed_dictionaries(
    {"dtype": st.sampled_from(sorted(sf.DTYPE_BITS)), "shape": st.lists(st.integers(0, 5), max_size=3),
     "data_offsets": st.lists(st.integers(0, 300), min_size=2, max_size=2)}), max_size=5),
    st.integers(0, 400))
def test_accepted_headers_cover_the_data_exactly(header, data_size):
    raw = json.dumps(header).encode()
    try:
        tensors, _ = sf.parse_header_bytes(raw, "h.safetensors", data_size=data_size)
    except CheckpointFormatError:
        return
    spans = sorted((t.begin, t.end) for t in tensors.values())
    pos = 0
    for begin, end in spans:
        assert begin == pos
        pos = end
    assert pos == data_size
    for t in tensors.values():
        assert t.end - t.begin == sf.tensor_nbytes(t.dtype, t.shape)
    import safetensors  # whatever we accept, the reference implementation accepts too
    safetensors.deserialize(struct.pack("<Q", len(raw)) + raw + bytes(data_size))


@st.composite
def _layouts(draw):
    """Mostly valid headers: contiguous layouts in a random key order, sometimes one offset nudged."""
    entries = draw(st.lists(st.tuples(st.text(min_size=1, max_size=4),
                                      st.sampled_from(sorted(sf.DTYPE_BITS)),
                                      st.lists(st.integers(0, 4), max_size=3)), max_size=6,
                            unique_by=lambda e: e[0]))
    header, pos = {}, 0
    for name, dtype, shape in entries:
        bits = sf.DTYPE_BITS[dtype]
        numel = 1
        for d in shape:
            numel *= d
        if numel * bits % 8:
            shape = shape + [2] if bits % 2 == 0 else shape + [8]
            numel *= shape[-1]
        n = numel * bits // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    names = draw(st.permutations(list(header)))
    if names and draw(st.booleans()):
        victim = header[draw(st.sampled_from(names))]["data_offsets"]
        victim[draw(st.integers(0, 1))] += draw(st.integers(-3, 3))
    return {n: header[n] for n in names}, pos + draw(st.sampled_from([0, 0, 0, 1, -1]))


@settings(max_examples=300, deadline=None)
@given(_layouts())
def test_parser_agrees_with_reference_implementation(layout):
    import safetensors
    header, data_size = layout
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + bytes(max(data_size, 0))
    try:
        sf.parse_header_bytes(raw, "h.safetensors", data_size=max(data_size, 0))
        ours = True
    except CheckpointFormatError:
        ours = False
    try:
        safetensors.deserialize(data)
        theirs = True
    except Exception:  # noqa: BLE001 - any rejection
        theirs = False
    assert ours == theirs, (header, data_size)
