"""Hostile checkpoints, end to end: ``load_pretrained`` (one process and two ranks),
``weightcast inspect`` and ``weightcast load --nproc 2``.

The cases are this module's :data:`HOSTILE` plus the format catalogue of tests/test_catalogue.py.
Each must raise the expected error class with a message naming the file or tensor and a fix,
the same on every rank; the CLI exits with status 2 and prints no traceback; and nothing
outside the checkpoint is opened (``faults.OpenRecorder`` patches ``os.open``, ``open`` and
``torch.UntypedStorage.from_file`` in-process) or read (``faults.reader_factory`` logs every
(file, offset, length) the loader reads).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ckpt_factory as cf  # sets HF_HUB_OFFLINE
import pytest
import torch
from safetensors.torch import save_file

from weightcast.launch.cli import main
from weightcast.orchestrator.errors import (CheckpointFormatError, ConfigError, DeviceMapError, LoadError,
                                 ModelMismatchError, PickleRefusedError, RemoteCodeRefusedError,
                                 UnsafePathError, WeightcastError)
from test_catalogue import CASES as CATALOGUE
from tests import faults

pytestmark = pytest.mark.timeout(300)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "model.safetensors"


@dataclass
class Hostile:
    """A built case: ``cls`` is what the load raises (``wrapped``: a failure after planning,
    raised as that class made a LoadError too); ``inspect`` is "error", "ok" (the files are valid,
    only the load refuses) or None (catalogue cases: tests/test_cli_inspect.py checks inspect);
    ``inspect_needles`` what inspect's error names when it differs from the load's (inspect has
    no ``allow_pickle``: it refuses a pickle-only checkpoint before looking further)."""
    path: Path
    cls: type
    needles: tuple[str, ...]
    load: dict = field(default_factory=dict)
    wrapped: bool = False
    inspect: str | None = "error"
    inspect_needles: tuple[str, ...] | None = None
    root: Path | None = None  # the checkpoint directory (default: path)


HOSTILE: dict[str, Callable[[Path], Hostile]] = {}


def case(fn: Callable[[Path], Hostile]) -> Callable[[Path], Hostile]:
    HOSTILE[fn.__name__] = fn
    return fn


def _ckpt(tmp: Path) -> Path:
    d = tmp / "ckpt"
    cf.write_sharded(d, cf.sample_tensors(), shards=3)
    return d


def _point(tmp: Path, tensor: str, file: str) -> Path:
    d = _ckpt(tmp)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"][tensor] = file
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _outside_file(tmp: Path) -> Path:
    """A valid safetensors file outside the checkpoint (what an escape would reach)."""
    path = tmp / "secret.safetensors"
    cf.write_single(tmp, {"positions": torch.arange(32, dtype=torch.int64)}, name=path.name)
    return path


# ------------------------------------------------------------------ names and links


@case
def index_traversal_to_real_file(tmp):
    _outside_file(tmp)
    return Hostile(_point(tmp, "positions", "../secret.safetensors"), UnsafePathError,
                   ("../secret.safetensors", "Fix:"))


@case
def index_traversal_to_etc_passwd(tmp):
    return Hostile(_point(tmp, "positions", "../" * 12 + "etc/passwd"), UnsafePathError,
                   ("etc/passwd", "plain relative name", "Fix:"))


@case
def index_absolute_etc_passwd(tmp):
    return Hostile(_point(tmp, "positions", "/etc/passwd"), UnsafePathError, ("/etc/passwd", "Fix:"))


@case
def index_backslash_traversal(tmp):
    return Hostile(_point(tmp, "positions", "..\\secret.safetensors"), UnsafePathError, ("secret.safetensors", "Fix:"))


@case
def index_nul_in_name(tmp):
    return Hostile(_point(tmp, "positions", "model\x00.safetensors"), UnsafePathError, ("model", "Fix:"))


@case
def index_subdir_symlink_escaping(tmp):
    outside = tmp / "elsewhere"
    outside.mkdir()
    _outside_file(outside)
    d = _point(tmp, "positions", "sub/secret.safetensors")
    os.symlink(outside, d / "sub")
    return Hostile(d, UnsafePathError, ("sub/secret.safetensors", "outside the checkpoint", "Fix:"))


@case
def index_file_symlink_escaping(tmp):
    d = _ckpt(tmp)
    os.replace(d / "model.safetensors.index.json", tmp / "elsewhere.index.json")
    os.symlink(tmp / "elsewhere.index.json", d / "model.safetensors.index.json")
    return Hostile(d, UnsafePathError, ("model.safetensors.index.json", "outside the checkpoint", "Fix:"))


@case
def weights_symlink_to_dev_zero(tmp):
    d = tmp / "ckpt"
    d.mkdir()
    os.symlink("/dev/zero", d / NAME)
    return Hostile(d, UnsafePathError, (NAME, "/dev/zero", "Fix:"))


@case
def weights_are_a_directory(tmp):
    d = tmp / "ckpt"
    (d / NAME).mkdir(parents=True)
    return Hostile(d, CheckpointFormatError, (NAME, "not a regular file", "Fix:"))


@case
def index_names_itself_as_shard(tmp):
    return Hostile(_point(tmp, "positions", "model.safetensors.index.json"), CheckpointFormatError,
                   ("model.safetensors.index.json", "Fix:"))


# ------------------------------------------------------------------ headers


@case
def header_length_2_pow_64_minus_1(tmp):
    cf.write_raw(tmp / NAME, b"{}      ", length=2**64 - 1)
    return Hostile(tmp, CheckpointFormatError, (NAME, "header length is too large", "Fix:"))


@case
def header_length_2_pow_63(tmp):
    cf.write_raw(tmp / NAME, b"{}      ", length=2**63)
    return Hostile(tmp, CheckpointFormatError, (NAME, "too large", "Fix:"))


@case
def header_deeply_nested_json(tmp):
    cf.write_raw(tmp / NAME, b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    return Hostile(tmp, CheckpointFormatError, (NAME, "not valid JSON", "Fix:"))


@case
def shape_10e12_elements_small_file(tmp):
    header, _ = cf.header_for({"w": ("U8", [10**6, 10**6], 10**12)})
    cf.write_raw(tmp / NAME, header, bytes(64))
    return Hostile(tmp, CheckpointFormatError, (NAME, "shorter than its header says", "Fix:"))


@case
def shape_10e12_elements_sparse_file(tmp):
    """A 1 TB sparse file whose header is valid: refused at planning, before any read."""
    header, n = cf.header_for({"w": ("U8", [10**6, 10**6], 10**12)})
    cf.write_raw(tmp / NAME, header)
    os.truncate(tmp / NAME, (tmp / NAME).stat().st_size + n)
    return Hostile(tmp, DeviceMapError, ("does not fit its memory", "'w'", NAME, "U8[1000000, 1000000]", "Fix:"),
                   inspect="ok")


@case
def shape_product_beyond_64_bits(tmp):
    header, _ = cf.header_for({"w": ("F32", [2**62, 2**62, 16], 16)})
    cf.write_raw(tmp / NAME, header, bytes(16))
    return Hostile(tmp, CheckpointFormatError, (NAME, "'w'", "does not match its dtype and shape", "Fix:"))


@case
def header_duplicate_metadata_key(tmp):
    cf.write_raw(tmp / NAME, b'{"__metadata__":{"format":"pt"},"__metadata__":{"format":"np"}}')
    return Hostile(tmp, CheckpointFormatError, (NAME, "duplicate key", "__metadata__", "Fix:"))


# ------------------------------------------------------------------ the model and the config


def _seq(tmp: Path, **change: torch.Tensor) -> Path:
    d = tmp / "seq"
    d.mkdir()
    tensors = {**faults.seq_tensors(), **change}
    save_file({k: v for k, v in tensors.items() if v is not None}, str(d / NAME))
    return d


@case
def dtype_not_matching_model(tmp):
    d = _seq(tmp, **{"0.weight": torch.ones(3, 4, dtype=torch.int8)})
    return Hostile(d, ModelMismatchError, ("tensor 0.weight", "floating point", "torch.int8", "Fix:"),
                   load={"model": "seq"}, wrapped=True, inspect="ok")


@case
def shape_not_matching_model(tmp):
    d = _seq(tmp, **{"0.weight": torch.ones(5, 4)})
    return Hostile(d, ModelMismatchError, ("tensor 0.weight", "(3, 4)", "(5, 4)", "Fix:"),
                   load={"model": "seq"}, wrapped=True, inspect="ok")


@case
def tensor_missing_for_model(tmp):
    d = _seq(tmp, **{"1.bias": None})
    return Hostile(d, ModelMismatchError, ("1.bias", "missing", "strict=False"),
                   load={"model": "seq"}, wrapped=True, inspect="ok")


def _remote_code_config(d: Path, tmp: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_evil.py").write_text(f"open({str(tmp / 'REMOTE_CODE_RAN')!r}, 'w').close()\n")


@case
def config_auto_map_remote_code(tmp):
    """A model type transformers does not know, whose classes only the checkpoint's code defines."""
    d = tmp / "llama"
    cf.save_tiny_llama(d, max_shard_size="10MB")
    _remote_code_config(d, tmp)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "evil_llama"
    config["architectures"] = ["EvilModel"]
    config["auto_map"]["AutoConfig"] = "modeling_evil.EvilConfig"
    (d / "config.json").write_text(json.dumps(config))
    return Hostile(d, RemoteCodeRefusedError, ("config.json", "auto_map", "trust_remote_code=True"),
                   load={"model": "auto"}, inspect="ok")


@case
def config_not_an_object(tmp):
    d = _ckpt(tmp)
    (d / "config.json").write_text("[1, 2, 3]")
    return Hostile(d, ConfigError, ("config.json", "not a JSON object"))


PICKLE_REFUSED = ("only pickle weights", "pytorch_model.bin", "allow_pickle=True")


@case
def pickle_only_refused(tmp):
    torch.save({"w": torch.ones(2)}, tmp / "pytorch_model.bin")
    return Hostile(tmp, PickleRefusedError, ("pytorch_model.bin", "allow_pickle=True"))


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@case
def pickle_with_code_even_when_allowed(tmp):
    """allow_pickle=True still loads with weights_only=True: the payload never runs."""
    with open(tmp / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"w": _Evil(str(tmp / "PICKLE_CODE_RAN"))}, fh)
    return Hostile(tmp, pickle.UnpicklingError, ("pytorch_model.bin", "UnpicklingError"),
                   load={"allow_pickle": True}, wrapped=True, inspect_needles=PICKLE_REFUSED)


@case
def config_symlink_escaping(tmp):
    d = _ckpt(tmp)
    (tmp / "outside.json").write_text('{"model_type": "llama"}')
    os.symlink(tmp / "outside.json", d / "config.json")
    return Hostile(d, UnsafePathError, ("config.json", "outside the checkpoint"))


@case
def pickle_symlink_escaping(tmp):
    d = tmp / "ckpt"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, tmp / "outside.bin")
    os.symlink(tmp / "outside.bin", d / "pytorch_model.bin")
    return Hostile(d, UnsafePathError, ("pytorch_model.bin", "outside the checkpoint"),
                   load={"allow_pickle": True}, inspect_needles=PICKLE_REFUSED)


# ------------------------------------------------------------------ building and checking


def _catalogue_case(name: str, tmp: Path) -> Hostile:
    path, cls, needle = CATALOGUE[name](tmp)
    return Hostile(path, cls, (needle,), inspect=None)  # inspect: tests/test_cli_inspect.py


ALL = {**{f"hostile:{n}": HOSTILE[n] for n in HOSTILE},
       **{f"catalogue:{n}": (lambda tmp, n=n: _catalogue_case(n, tmp)) for n in CATALOGUE}}


UNBUILDABLE: dict[str, str] = {}  # case -> why it cannot be built with the installed libraries


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Hostile]:
    out = {}
    for name, build in ALL.items():
        tmp = tmp_path_factory.mktemp(name.split(":")[1][:40])
        try:
            out[name] = build(tmp)
        except pytest.skip.Exception as exc:  # e.g. a dtype the installed safetensors lacks
            UNBUILDABLE[name] = str(exc)
            continue
        out[name].root = out[name].root or out[name].path
    return out


def _load_kwargs(h: Hostile) -> dict:
    kw = {"model": None, "transport": "collective", "timeout": 60, **h.load}
    if kw["model"] == "seq":
        kw["model"] = faults.seq_model
    return kw


def check_error(exc: BaseException, h: Hostile, name: str) -> None:
    """The error class (after planning: that class made a LoadError too, naming the failing
    rank) and a message with file/tensor and fix."""
    msg = str(exc)
    if h.wrapped:  # ``cls`` is the failing rank's error class, or the cause it names
        assert isinstance(exc, LoadError) and exc.rank == 0 and exc.phase, (name, type(exc), msg)
        assert f"{h.cls.__name__}: " in msg, (name, msg)
        if issubclass(h.cls, WeightcastError):
            assert isinstance(exc, h.cls) and type(exc).__name__ == exc.cause == h.cls.__name__, (name, type(exc))
    else:
        assert type(exc) is h.cls, (name, type(exc), msg)
    for needle in h.needles:
        assert needle in msg, (name, needle, msg)
    if not name.startswith("catalogue:") or h.cls is not CheckpointFormatError:
        assert "Fix:" in msg, (name, msg)


@pytest.mark.parametrize("name", sorted(ALL))
def test_load_pretrained_refuses_and_reads_nothing_outside(name, built, tmp_path, monkeypatch):
    if name not in built:
        pytest.skip(f"not buildable here: {UNBUILDABLE[name]}")
    h = built[name]
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    log = tmp_path / "reads.jsonl"
    monkeypatch.setenv("WC_READ_LOG", str(log))
    from weightcast.workers.api import load_pretrained
    from weightcast.workers.testing import inject
    error = None
    with faults.OpenRecorder() as opened, inject(reader_factory=faults.reader_factory):
        try:
            load_pretrained(str(h.path), progress=False, **_load_kwargs(h))
        except BaseException as exc:  # noqa: BLE001 - checked below
            error = exc
    root = h.root if h.root.is_dir() else h.root.parent
    assert not list(root.parent.glob("*_CODE_RAN")), "code from the checkpoint ran"
    outside = opened.outside(str(root), ignore=(str(log),))
    bad_reads = faults.reads_outside(str(log), str(root))
    assert error is not None, f"{name}: no error"
    check_error(error, h, name)
    assert outside == [] and bad_reads == [], (outside, bad_reads)


MULTI_RANK_CATALOGUE = ("length_over_100mb", "index_dotdot_name", "symlink_escaping_directory",
                        "header_duplicate_tensor", "pickle_only_directory", "size_mismatch_truncated_download")


def test_every_rank_raises_the_same_error(built):
    """Two ranks, one process group, the cases in a row: the same error on both ranks. (Every
    catalogue case fails in rank 0's planning like these six; one process checks them all.)"""
    names = [n for n in sorted(built) if built[n].load.get("model") != "auto"
             and (n.startswith("hostile:") or n.split(":")[1] in MULTI_RANK_CATALOGUE)]
    cases = [{"load": {"source": str(built[n].path), **built[n].load}} for n in names]
    load = {"model": None, "transport": "collective", "timeout": 60}
    outs = faults.run_ranks(2, faults.sequence_scenario, {"load": load, "cases": cases}, user_group=True,
                            timeout=240)
    assert [o.exitcode for o in outs] == [0, 0], [o.error for o in outs]
    for i, name in enumerate(names):
        h, got = built[name], [o.value[i] for o in outs]
        assert got[0].get("type") == got[1].get("type") and got[0].get("error") == got[1].get("error"), got
        if h.wrapped and not issubclass(h.cls, WeightcastError):  # a cause the error names
            assert f"{h.cls.__name__}: " in got[0]["error"], (name, got[0])
        else:  # after planning too: the class of the failing rank's error
            assert got[0].get("type") == h.cls.__name__, (name, got[0])
        for needle in h.needles:
            assert needle in got[0]["error"], (name, needle, got[0]["error"])
    slowest = sorted(((round(outs[0].value[i]["seconds"], 2), n) for i, n in enumerate(names)), reverse=True)[:3]
    print(f"\n{len(names)} hostile inputs refused identically on 2 ranks; slowest: {slowest}")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_inspect(name, built, capsys):
    h = built[f"hostile:{name}"]
    code, out, err = _cli(capsys, "inspect", str(h.path))
    assert "Traceback" not in err
    if h.inspect == "ok":
        assert code == 0, err
        return
    assert code == 2 and out == "" and err.startswith("weightcast inspect: error: "), (code, err)
    for needle in h.inspect_needles or h.needles:
        assert needle in err, (needle, err)
    assert "Fix:" in err, err


CLI_LOAD = ["index_traversal_to_real_file", "shape_10e12_elements_sparse_file", "config_auto_map_remote_code"]


@pytest.mark.parametrize("name", CLI_LOAD)
def test_cli_load_two_ranks(name, built, capsys):
    h = built[f"hostile:{name}"]
    model = h.load.get("model", "none")
    code, out, err = _cli(capsys, "load", str(h.path), "--nproc", "2", "--timeout", "60", "--model", model)
    assert code == 2 and "Traceback" not in err, (code, err)
    assert err.startswith("weightcast load: error: "), err
    for needle in h.needles:
        assert needle in err, (needle, err)


def test_cli_load_real_process_exit_status(built):
    h = built["hostile:header_length_2_pow_64_minus_1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "weightcast.launch.cli", "load", str(h.path), "--nproc", "2", "--timeout", "60"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "weightcast load: error: " in proc.stderr and "Traceback" not in proc.stderr
    assert all(needle in proc.stderr for needle in h.needles), proc.stderr


def test_native_type_with_auto_map_loads_the_library_class(tmp_path, monkeypatch):
    """A native model type carrying an ``auto_map`` is not refused: with or without
    trust_remote_code, model="auto" builds the class config.json names from transformers (as
    LlamaForCausalLM.from_pretrained does); the checkpoint's module is never imported."""
    from weightcast.workers.api import load_pretrained
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    d = tmp_path / "llama"
    cf.save_tiny_llama(d, max_shard_size="10MB")
    _remote_code_config(d, tmp_path)
    for trust in (False, True):
        model = load_pretrained(str(d), model="auto", trust_remote_code=trust, progress=False)
        assert type(model).__name__ == "LlamaForCausalLM"
    assert not list(tmp_path.glob("*_CODE_RAN"))


def test_enough_bad_inputs():
    assert len(ALL) >= 35
