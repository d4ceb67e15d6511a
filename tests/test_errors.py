"""Errors keep their parts as attributes (what, where, expected, got, fix; rank, host, phase and
the original class when they crossed ranks), survive pickling between ranks, and a failure on
one rank of a load reaches every rank as the failing rank's own class."""
from __future__ import annotations

import os
import pickle

import pytest
from safetensors.torch import save_file

from tests import faults
from weightcast.orchestrator.errors import (CacheError, ConfigError, LoadError, ModelMismatchError, StorageError,
                                            WeightcastError, peer_class, peer_error)


def test_parts_are_attributes_and_survive_pickling():
    err = ModelMismatchError("A tensor does not fit", where="tensor w", expected="[3, 4]", got="[5, 4]",
                             fix="check the model")
    assert (err.what, err.where, err.expected, err.got, err.fix) == ("A tensor does not fit", "tensor w", "[3, 4]",
                                                                     "[5, 4]", "check the model")
    assert err.rank is None and err.host is None and err.phase is None and err.cause is None
    assert str(err) == ("A tensor does not fit. Where: tensor w. Expected: [3, 4]. Got: [5, 4]. "
                        "Fix: check the model.")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ModelMismatchError and back.fields() == err.fields() and str(back) == str(err)


@pytest.mark.parametrize("cls", [ModelMismatchError, ConfigError, StorageError, CacheError])
def test_peer_error_is_the_original_class_and_a_load_error(cls):
    err = cls("It broke", where="file a", got="b", fix="c")
    peer = peer_error(err, rank=3, host="node7", phase="transfer")
    assert isinstance(peer, cls) and isinstance(peer, LoadError) and type(peer).__name__ == cls.__name__
    assert (peer.rank, peer.host, peer.phase, peer.cause) == (3, "node7", "transfer", cls.__name__)
    assert (peer.what, peer.where, peer.got, peer.fix) == ("It broke", "file a", "b", "c")
    assert str(peer).startswith(f"The load failed during transfer on rank 3 (host node7): {cls.__name__}: It broke.")
    back = pickle.loads(pickle.dumps(peer))  # e.g. a Ray actor's error reaching the driver
    assert type(back) is peer_class(cls) and back.fields() == peer.fields() and str(back) == str(peer)
    assert peer_class(LoadError) is LoadError and issubclass(peer_class(cls), WeightcastError)


def _mismatch_scenario(args: dict) -> dict:
    """One load whose model does not match on rank ``WC_BAD_MODEL_RANK``: what each rank caught."""
    try:
        faults.load_scenario(args)
    except ModelMismatchError as exc:
        return {"caught": type(exc).__name__, "load_error": isinstance(exc, LoadError), **exc.fields()}
    return {"caught": None}


def test_every_rank_catches_the_failing_ranks_class(tmp_path):
    """2 ranks, the model does not match on rank 1 only: ``except ModelMismatchError`` fires on
    both ranks, each carrying rank 1, its host, the phase and the original class."""
    save_file(faults.seq_tensors(), str(tmp_path / "model.safetensors"))
    args = {"source": str(tmp_path), "model": "seq", "timeout": 60, "transport": "collective"}
    outs = faults.run_ranks(2, _mismatch_scenario, args, env={"WC_BAD_MODEL_RANK": "1"}, timeout=120)
    assert [o.exitcode for o in outs] == [0, 0], [o.error for o in outs]
    for o in outs:
        got = o.value
        assert got["caught"] == "ModelMismatchError" and got["load_error"], got
        assert (got["rank"], got["phase"], got["cause"]) == (1, "materialize", "ModelMismatchError"), got
        assert got["host"] and got["where"] and got["fix"], got
    assert outs[0].value == outs[1].value
    assert faults.stray_processes() == []


def test_planning_errors_carry_rank_host_and_phase(tmp_path, monkeypatch):
    """Rank 0's planning error reaches the caller as its own class with rank 0 and phase plan."""
    from weightcast.workers.api import load_pretrained
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    os.truncate(tmp_path / "model.safetensors", 4)
    with pytest.raises(WeightcastError) as info:
        load_pretrained(str(tmp_path), model=None, progress=False)
    assert not isinstance(info.value, LoadError), type(info.value)
    assert (info.value.rank, info.value.phase) == (0, "plan") and info.value.host
