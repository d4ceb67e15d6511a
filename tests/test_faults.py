"""Storage faults on one rank of three: each is the same clear error on every rank, or (partial
and slow reads under the timeout) a bit-exact load.

Faults act below the real FileReader (``os.preadv`` returning EIO, end of file, or half of
what was asked), in the reader (slow reads), or on the files (rewritten or truncated after
rank 0 planned, caught by the size + mtime stamps of the plan; flipped bytes caught by
``verify_checksums``). All cases run in one process group, one load after the other; see
tests/faults.py for the injection points.
"""
from __future__ import annotations

import os
import shutil
import zlib

import pytest
from safetensors.torch import load_file, save_file

from tests import faults
from tests.ckpt_factory import sample_tensors, write_sharded
from weightcast.workers.reader import checksum_metadata, tensor_crc32

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 10.0
SHARD = "model-00002-of-00003.safetensors"


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("faults")
    plain = str(base / "plain")
    write_sharded(plain, sample_tensors(), shards=3)
    out = {"plain": plain}
    for name in ("rewrite", "truncate", "rewrite-ns"):
        out[name] = _copy(plain, base / name)
    tensors = sample_tensors()
    crc = base / "crc"
    crc.mkdir()
    save_file(tensors, str(crc / "model.safetensors"), metadata={"format": "pt", **checksum_metadata(tensors)})
    out["crc"] = str(crc)
    bad = _copy(str(crc), base / "crc-bad")
    _flip_last_byte_of(os.path.join(bad, "model.safetensors"), "layers.0.attn.q.weight")
    out["crc-bad"] = bad
    return out


def _flip_last_byte_of(path: str, tensor: str) -> None:
    """Change one byte of ``tensor`` in place (same size; stamps are taken after this)."""
    from weightcast.orchestrator.checkpoint import load_index
    entry = load_index(path).tensor(tensor)
    with open(path, "r+b") as fh:
        fh.seek(entry.end - 1)
        byte = fh.read(1)
        fh.seek(entry.end - 1)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _expected_crcs(root: str) -> dict[str, int]:
    out = {}
    for f in sorted(os.listdir(root)):
        if f.endswith(".safetensors"):
            out.update({k: tensor_crc32(v) for k, v in load_file(os.path.join(root, f)).items()})
    return out


def _cases(c: dict[str, str]) -> list[tuple[str, dict, tuple[str, ...] | None]]:
    """(name, case, needles): needles None means the load must succeed, bit for bit."""
    shard = lambda key: {"WC_FAULT_FILE": os.path.join(c[key], SHARD)}  # noqa: E731
    return [
        ("eio", {"env": {"WC_READ": "eio@1"}},
         ("during transfer on rank 1", "StorageError: Reading a checkpoint file failed", "Input/output error")),
        ("eof", {"env": {"WC_READ": "eof@2"}},
         ("during transfer on rank 2", "Short read: the file ended early", "Fix:")),
        ("partial-reads", {"env": {"WC_READ": "short@1"}}, None),
        ("slow-under-timeout", {"env": {"WC_READ": "slow@1", "WC_READ_DELAY": "0.2"}}, None),
        ("eio-node-shared", {"env": {"WC_READ": "eio@2"}, "load": {"transport": "node-shared"}},
         ("during transfer on rank 2", "Input/output error")),
        ("rewritten", {"env": {"WC_FAULT": "rewrite@0:transfer", **shard("rewrite")},
                       "load": {"source": c["rewrite"]}},
         ("during transfer on rank", "changed between planning and reading", SHARD, "mtime_ns")),
        ("truncated", {"env": {"WC_FAULT": "truncate@0:transfer", **shard("truncate")},
                       "load": {"source": c["truncate"]}},
         ("during transfer on rank", "changed between planning and reading", SHARD, "Fix:")),
        ("rewritten-node-shared", {"env": {"WC_FAULT": "rewrite@0:transfer", **shard("rewrite-ns")},
                                   "load": {"source": c["rewrite-ns"], "transport": "node-shared"}},
         ("during transfer on rank", "changed between planning and reading", SHARD)),
        ("checksums-match", {"load": {"source": c["crc"], "verify_checksums": True}}, None),
        ("checksum-mismatch", {"load": {"source": c["crc-bad"], "verify_checksums": True}},
         ("during transfer on rank 0 (and ranks [1, 2])", "do not match the checksum",
          "tensor 'layers.0.attn.q.weight'", "re-download")),
        ("no-checksums", {"load": {"verify_checksums": True}},
         ("verify_checksums needs checksums", "weightcast.crc32.", "Fix:")),
        ("slow-over-timeout", {"env": {"WC_READ": "slow@1", "WC_READ_DELAY": "3"}, "load": {"timeout": 2.0}},
         ("Lost contact with another rank", "timeout=2 s")),
    ]


def test_storage_faults_fail_together_or_load_bit_exact(ckpts, record_property):
    cases = _cases(ckpts)
    load = {"source": ckpts["plain"], "model": None, "timeout": TIMEOUT, "transport": "collective",
            "chunk_bytes": 128, "bucket_bytes": 512}
    outs = faults.run_ranks(3, faults.sequence_scenario, {"load": load, "cases": [c for _, c, _ in cases]},
                            user_group=True, timeout=240)
    assert [o.exitcode for o in outs] == [0, 0, 0], [o.error for o in outs]
    want = {"plain": _expected_crcs(ckpts["plain"]), "crc": _expected_crcs(ckpts["crc"])}
    seconds = {}
    for i, (name, case, needles) in enumerate(cases):
        got = [o.value[i] for o in outs]
        seconds[name] = max(g["seconds"] for g in got)
        if needles is None:
            source = "crc" if case.get("load", {}).get("source") == ckpts["crc"] else "plain"
            assert all(g.get("value") == want[source] for g in got), (name, got)
            continue
        assert all("error" in g for g in got), (name, got)
        if name != "slow-over-timeout":  # there each rank says what it saw of the others
            assert len({g["error"] for g in got}) == 1, (name, got)
        for needle in needles:
            assert needle in got[0]["error"], (name, needle, got[0]["error"])
    assert seconds["slow-over-timeout"] < 2.0 * 2 + 3.0 + 5.0, seconds
    record_property("seconds_per_case", {k: round(v, 2) for k, v in seconds.items()})
    print("\nseconds per storage-fault case:", {k: round(v, 2) for k, v in seconds.items()})
    assert faults.stray_processes() == []


def test_checksum_metadata_is_crc32_of_the_raw_bytes():
    tensors = sample_tensors()
    meta = checksum_metadata(tensors)
    t = tensors["embed.weight"]
    raw = t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
    assert meta["weightcast.crc32.embed.weight"] == f"{zlib.crc32(raw):08x}"
    assert meta["weightcast.crc32.empty"] == "00000000"
    assert len(meta) == len(tensors)


def test_single_process_faults_keep_their_class(tmp_path, monkeypatch):
    """Without a process group the StorageError itself reaches the caller, wrapped once."""
    from weightcast.workers.api import load_pretrained
    from weightcast.workers.testing import inject
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    write_sharded(tmp_path, sample_tensors(), shards=2)
    monkeypatch.setenv("WC_READ", "eio@0")
    with pytest.raises(Exception) as info:
        with inject(reader_factory=faults.reader_factory):
            load_pretrained(str(tmp_path), model=None, transport="collective")
    from weightcast.orchestrator.errors import LoadError, StorageError
    assert isinstance(info.value, StorageError) and isinstance(info.value, LoadError)
    assert type(info.value).__name__ == "StorageError" and info.value.phase == "transfer" and info.value.rank == 0
    assert "StorageError: Reading a checkpoint file failed" in str(info.value)
    assert type(info.value.__cause__).__name__ == "StorageError"


def test_cli_verify_checksums_names_the_corrupt_tensor(ckpts, capsys):
    """``weightcast load --verify-checksums`` on two ranks: exit 2, the tensor named, no traceback;
    the intact copy loads and verifies."""
    from weightcast.launch.cli import main
    code = main(["load", ckpts["crc-bad"], "--nproc", "2", "--timeout", "60", "--verify-checksums"])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, err
    assert "tensor 'layers.0.attn.q.weight'" in err and "do not match the checksum" in err and "Fix:" in err
    assert main(["load", ckpts["crc"], "--nproc", "2", "--timeout", "60", "--verify-checksums"]) == 0
