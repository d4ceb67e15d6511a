"""Read leases close the window between the file guard's checks and the first touch of the
mapped pages (node-shared transport): a truncation or an open for writing by another process
waits until the ranks' watching threads noticed it and replaced their mappings by zero pages,
the load fails with a StorageError naming the file on every rank, never a SIGBUS, and the
writer goes on at once. Without leases (the control) the same truncation kills the rank with
SIGBUS. After a load the leases are gone; a file that cannot be leased (open for writing) loads
with the identity checks alone.

Three forked gloo ranks (tests/faults.py) load a 2-shard checkpoint of 6 MB, casting to float16
in materialize so every owned byte is touched there.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests import faults
from tests.ckpt_factory import write_sharded

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """Two shards of 3 MB (many pages): a truncation removes whole mapped pages."""
    import torch
    d = tmp_path_factory.mktemp("lease")
    g = torch.Generator().manual_seed(1)
    write_sharded(d, {f"layer{i}.weight": torch.randn(512, 512, generator=g) for i in range(6)}, shards=2)
    return str(d)


def _copy(ckpt: str, tmp_path) -> tuple[str, str]:
    """A private copy of the checkpoint and its first shard (rank 0 owns tensors of it)."""
    root = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, root)
    return root, sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".safetensors"))[0]


def _no_lease_reason(path: str) -> str | None:
    """Why this file system gives no read lease on ``path`` (None: it does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return None
    except OSError as exc:
        return f"no read lease on {path}: {exc.strerror}"
    finally:
        os.close(fd)


def _args(root: str) -> dict:
    return {"source": root, "model": None, "timeout": TIMEOUT, "transport": "node-shared", "dtype": "float16"}


def _no_lease_left(path: str) -> bool:
    """No process holds a lease on ``path``: a non-blocking open for writing succeeds (a lease
    would make it fail with EAGAIN)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)
    return True


def _writer_case(ckpt: str, tmp_path, kind: str, at: str, extra: dict) -> tuple[list, str]:
    root, shard = _copy(ckpt, tmp_path)
    reason = _no_lease_reason(shard)
    if reason:
        pytest.skip(reason)
    env = {"WC_FAULT": f"{kind}@0:{at}", "WC_FAULT_FILE": shard, "WC_TRUNCATE_TO": "0", **extra}
    return faults.run_ranks(3, faults.load_scenario, _args(root), env=env, timeout=60), shard


def _assert_failed_together(outs: list, shard: str) -> None:
    assert [o.exitcode for o in outs] == [2, 2, 2], [(o.exitcode, o.error) for o in outs]  # -7: SIGBUS
    for o in outs:
        assert o.error_type == "StorageError", (o.error_type, o.error)
        assert os.path.basename(shard) in o.error, o.error
    assert "is being changed (opened for writing or truncated) during the load" in outs[0].error, outs[0].error


def _assert_writer_went_on(outs: list, record_property) -> None:
    (writer,) = outs[0].writers
    assert writer["returncode"] == 0 and writer["done"] is not None, writer
    after = round(writer["done"] - min(o.t_error for o in outs), 3)
    record_property("error_to_writer_done_s", after)
    print(f"\nthe writer ended {after} s after the first rank's error (negative: before)")
    assert after < 2.0, after


def test_truncation_between_check_and_touch_is_a_storage_error_not_sigbus(ckpt, tmp_path, record_property) -> None:
    """Rank 0 passes the file guard's checks before materialize, then a writer process
    truncates a shard it maps (``os.truncate``, blocking) before rank 0 touches a page of it.
    With leases: the writer waits, every rank raises a StorageError naming the file, the writer
    ends within 2 s of the error, no process and no lease is left (one node: nothing is staged
    in /dev/shm). Control, leases off: rank 0 dies of SIGBUS."""
    outs, shard = _writer_case(ckpt, tmp_path / "leased", "writer-truncate", "materialize-checked", {})
    _assert_failed_together(outs, shard)
    _assert_writer_went_on(outs, record_property)
    assert os.path.getsize(shard) == 0  # the truncation happened, after the load
    assert faults.stray_processes() == [] and _no_lease_left(shard)  # one node: nothing staged in /dev/shm
    control, shard = _writer_case(ckpt, tmp_path / "control", "writer-truncate", "materialize-checked",
                                  {"WC_NO_LEASES": "1"})
    assert control[0].exitcode == -7, [(o.exitcode, o.error) for o in control]  # SIGBUS
    assert os.path.getsize(shard) == 0
    assert faults.stray_processes() == []


def test_truncation_during_a_long_touch_step_is_a_storage_error_not_sigbus(ckpt, tmp_path, record_property) -> None:
    """A writer truncates a shard right after the ranks' checks before materialize, and the
    ranks only touch the mapped pages once the truncation happened (as touch steps outlasting
    the kernel's lease-break-time would): their watching threads replaced their mappings by
    zero pages and released the leases first, so they read zeros instead of faulting, and every
    rank then raises a StorageError naming the file (the truncation ends before any error)."""
    outs, shard = _writer_case(ckpt, tmp_path, "writer-truncate-done", "materialize-checked", {})
    _assert_failed_together(outs, shard)
    assert "replaced by zero pages" in outs[0].error, outs[0].error
    (writer,) = outs[0].writers
    assert writer["returncode"] == 0 and writer["done"] < min(o.t_error for o in outs), (writer, outs)
    assert os.path.getsize(shard) == 0
    assert faults.stray_processes() == []


def test_in_place_writer_during_the_load_is_a_storage_error(ckpt, tmp_path, record_property) -> None:
    """A writer opens a shard with ``open(path, "r+b")`` while the ranks hold it mapped (start
    of materialize): it waits until the ranks noticed it; every rank raises a StorageError
    naming the file; the writer flips its byte and ends within 2 s of the first error."""
    outs, shard = _writer_case(ckpt, tmp_path, "writer-open", "materialize", {})
    _assert_failed_together(outs, shard)
    _assert_writer_went_on(outs, record_property)
    assert faults.stray_processes() == [] and _no_lease_left(shard)


# ---------------------------------------------------------------- after the load, and without a lease


def _data_offset(shard: str, name: str) -> int:
    """Where tensor ``name``'s bytes start in a safetensors file."""
    import json
    import struct
    with open(shard, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return 8 + n + json.loads(fh.read(n))[name]["data_offsets"][0]


def _timed(code: str) -> float:
    """Seconds a writer process (``code``) takes, interpreter start-up included."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-S", "-c", code], check=True, timeout=30)
    return time.monotonic() - start


def _open_under(root: str) -> list[str]:
    """Paths under ``root`` this process holds a descriptor of."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith(root + os.sep):
            out.append(link)
    return out


def _after_load(args: dict) -> dict:
    """Scenario: a zero-copy node-shared load; once every rank returned, rank 0 truncates the
    second shard and flips the first byte of ``layer0.weight`` in place (other processes); then
    each rank reads that byte through its tensor and touches ``layer5.weight`` (in the truncated
    shard) from a forked child."""
    import ctypes
    import torch
    import torch.distributed as dist
    from weightcast.workers.api import load_pretrained
    got = load_pretrained(args["source"], model=None, transport="node-shared", timeout=TIMEOUT, progress=False)
    out = {"open": _open_under(os.path.realpath(args["source"]))}
    dist.barrier()
    if dist.get_rank() == 0:
        out["truncate_s"] = _timed(f"import os; os.truncate({args['second']!r}, 0)")
        out["rewrite_s"] = _timed(f"f = open({args['first']!r}, 'r+b'); f.seek({args['offset']}); "
                                  f"f.write(bytes([{args['flipped']}])); f.close()")
    dist.barrier()
    out["first_byte"] = got["layer0.weight"].view(torch.uint8).reshape(-1)[0].item()
    pid = os.fork()
    if pid == 0:  # a page the truncation removed
        ctypes.string_at(got["layer5.weight"].data_ptr(), 4)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    out["touch_signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return out


def test_leases_are_released_when_the_load_returns(ckpt, tmp_path) -> None:
    """After a load returned no loading process holds a checkpoint file open; a truncation by
    another process ends at once (< 1 s, interpreter start-up included), and the zero-copy
    tensors behave as the README says: an in-place rewrite shows through a page never written,
    a page the truncation removed raises SIGBUS when touched."""
    import signal
    root, first = _copy(ckpt, tmp_path)
    second = first.replace("00001-of", "00002-of")
    offset = _data_offset(first, "layer0.weight")
    with open(first, "rb") as fh:
        fh.seek(offset)
        flipped = fh.read(1)[0] ^ 0xFF
    args = {"source": root, "first": first, "second": second, "offset": offset, "flipped": flipped}
    outs = faults.run_ranks(2, _after_load, args, timeout=60)
    assert [o.exitcode for o in outs] == [0, 0], [(o.exitcode, o.error) for o in outs]
    for o in outs:
        assert o.value["open"] == [], o.value
        assert o.value["first_byte"] == flipped
        assert o.value["touch_signal"] == signal.SIGBUS
    print(f"\nafter the load: truncate {outs[0].value['truncate_s']:.3f} s, rewrite {outs[0].value['rewrite_s']:.3f} s")
    assert outs[0].value["truncate_s"] < 1.0 and outs[0].value["rewrite_s"] < 1.0
    assert os.path.getsize(second) == 0
    assert faults.stray_processes() == []


def test_file_without_a_lease_loads_with_the_identity_checks(ckpt, tmp_path, monkeypatch, caplog) -> None:
    """A shard open for writing elsewhere cannot be leased (EAGAIN): the load goes on with the
    identity and page checks for that file, says so at debug level and in the report
    (``unleased_files``), and returns the checkpoint's tensors bit for bit."""
    import logging
    import torch
    from safetensors.torch import load_file
    from weightcast.workers.api import load_pretrained
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    root, first = _copy(ckpt, tmp_path)
    if _no_lease_reason(first):
        pytest.skip(_no_lease_reason(first))
    want = {}
    for f in sorted(os.listdir(root)):
        if f.endswith(".safetensors"):
            want.update({k: v.clone() for k, v in load_file(os.path.join(root, f)).items()})
    with open(first, "r+b"), caplog.at_level(logging.DEBUG, logger="weightcast"):
        got, report = load_pretrained(root, model=None, transport="node-shared", return_report=True, progress=False)
    (rank,) = report["ranks"]
    assert list(rank["unleased_files"]) == [os.path.basename(first)], rank["unleased_files"]
    assert "open for writing" in rank["unleased_files"][os.path.basename(first)]
    assert any("no read lease on" in r.getMessage() and first in r.getMessage() for r in caplog.records)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _open_under(os.path.realpath(root)) == []


def test_watcher_maps_zero_pages_and_lets_the_writer_go(tmp_path) -> None:
    """FileLeases alone (one process): a mapped, leased file; a writer truncating it waits until
    the watching thread replaced the mapping by zero pages and released the lease (well under a
    second, not lease-break-time); the tensor then reads zeros, the next poll is a StorageError
    naming the file, and release() drops the mappings it held. Once unwatched, nothing is
    replaced: a second writer waits for release()."""
    import torch
    from weightcast.orchestrator.errors import StorageError
    from weightcast.workers.file_lease import FileLeases
    path = str(tmp_path / "f.bin")
    with open(path, "wb") as fh:
        fh.write(os.urandom((1 << 20) + 5))
    if _no_lease_reason(path):
        pytest.skip(_no_lease_reason(path))
    leases = FileLeases()
    assert leases.take("f.bin", path) is not None
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=(1 << 20) + 5)
    view = torch.empty(0, dtype=torch.uint8).set_(storage)
    leases.note_mapping("f.bin", storage)
    assert int(view.sum()) > 0
    leases.watch(0.05)
    waited = _timed(f"import os; os.truncate({path!r}, 0)")
    assert waited < 1.0 and os.path.getsize(path) == 0, waited
    assert int(view.sum()) == 0  # zero pages, not a SIGBUS
    with pytest.raises(StorageError, match="being changed") as info:
        leases.poll()
    assert path in str(info.value) and "replaced by zero pages" in str(info.value)
    leases.release()
    assert leases.mapped == {} and leases.fds == {}

    with open(path, "wb") as fh:  # once unwatched, a writer waits for release()
        fh.write(os.urandom(1 << 16))
    again = FileLeases()
    again.take("f.bin", path)
    again.watch(0.05)
    again.unwatch()
    writer = subprocess.Popen([sys.executable, "-S", "-c", f"import os; os.truncate({path!r}, 0)"])
    time.sleep(0.5)
    assert writer.poll() is None  # still held off
    again.release()
    assert writer.wait(timeout=10) == 0 and os.path.getsize(path) == 0
