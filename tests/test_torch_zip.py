"""``orchestrator.torch_zip``: byte ranges of a torch.save file's tensors, read without unpickling
anything but weights, bit-identical to torch.load; damaged files and unsafe pickles refused."""
from __future__ import annotations

import collections
import os
import zipfile

import pytest
import torch

from weightcast.orchestrator.errors import CheckpointFormatError, PickleRefusedError
from weightcast.orchestrator.torch_zip import TensorRef, parse_torch_save


def _value(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _read(path: str, ref: TensorRef) -> torch.Tensor:
    with open(path, "rb") as f:
        f.seek(ref.offset)
        data = bytearray(f.read(ref.length))
    if not data:
        return torch.empty(ref.shape, dtype=getattr(torch, ref.dtype))
    return torch.frombuffer(data, dtype=getattr(torch, ref.dtype)).reshape(ref.shape)


def _saved(tmp_path, obj, name="state.pt") -> str:
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def test_every_tensor_matches_torch_load(tmp_path) -> None:
    """An AdamW state dict, views into a shared storage (offsets), bf16 / int64 / bool / empty and
    0-d tensors, nested containers: each range holds exactly what torch.load returns."""
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 7)).sum().backward()
    opt.step()
    base = torch.arange(40, dtype=torch.float32)
    obj = {"optimizer": opt.state_dict(), "views": [base[3:13], base[20:30].view(2, 5)],
           "mixed": collections.OrderedDict(bf16=torch.randn(3, 4).bfloat16(), i64=torch.arange(9),
                                            flag=torch.tensor([True, False]), empty=torch.empty(0, 3),
                                            scalar=torch.tensor(2.5)), "plain": (1, "two", 3.0)}
    path = _saved(tmp_path, obj)
    idx = parse_torch_save(path)
    loaded = torch.load(path, weights_only=True)
    refs = list(idx.tensors())
    assert len(refs) == 4 * 3 + 2 + 5  # 4 parameters x (step, exp_avg, exp_avg_sq)
    for key_path, ref in refs:
        want = _value(loaded, key_path)
        got = _read(path, ref)
        assert got.dtype == want.dtype and torch.equal(got, want), key_path
    assert idx.obj["plain"] == (1, "two", 3.0)
    assert idx.obj["optimizer"]["param_groups"] == loaded["optimizer"]["param_groups"]
    for m in idx.members.values():
        assert 0 <= m.offset <= m.end <= idx.size


def test_truncated_file_is_refused(tmp_path) -> None:
    path = _saved(tmp_path, {"w": torch.randn(64, 64)})
    size = os.path.getsize(path)
    for cut in (size - 1, size - 30, size // 2, 10):
        with open(path, "rb") as f:
            data = f.read(cut)
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data)
        with pytest.raises(CheckpointFormatError):
            parse_torch_save(str(bad))


def test_corrupt_directory_and_sizes_are_refused(tmp_path) -> None:
    path = _saved(tmp_path, {"w": torch.randn(16, 16)})
    data = bytearray(open(path, "rb").read())
    cd = data.rfind(b"PK\x01\x02")
    for offset, value in ((cd, 0x00), (cd + 24, 0xFF), (cd + 42, 0x7F)):  # signature, size, header offset
        broken = bytearray(data)
        broken[offset] = value
        bad = tmp_path / f"bad{offset}.pt"
        bad.write_bytes(bytes(broken))
        with pytest.raises(CheckpointFormatError):
            parse_torch_save(str(bad))


def test_compressed_member_is_refused(tmp_path) -> None:
    path = _saved(tmp_path, {"w": torch.zeros(256)})
    out = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(CheckpointFormatError, match="compressed"):
        parse_torch_save(str(out))


class NotWeights:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_that_is_not_weights_only_is_refused(tmp_path) -> None:
    path = _saved(tmp_path, {"w": torch.ones(2), "evil": NotWeights()})
    with pytest.raises(PickleRefusedError, match="weights-only"):
        parse_torch_save(str(path))


def test_not_a_zip(tmp_path) -> None:
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"\x80\x02" + b"\x00" * 100)  # a legacy (non-zip) pickle header
    with pytest.raises(CheckpointFormatError, match="end-of-central-directory"):
        parse_torch_save(str(bad))
