"""The prepare step is shared: ``weightcast plan`` refuses exactly what a load refuses, with the
same error class (remote code, a broken HF cache, a plan that does not fit), and the load order
crosses ranks encoded once (a round trip through plan_codec gives the same order)."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere

import pytest

import ckpt_factory as cf
from hfcache_factory import build_hf_cache, make_text_link

from weightcast.launch.cli import main as cli
from weightcast.orchestrator.errors import CacheError, DeviceMapError, RemoteCodeRefusedError

NAME = "model.safetensors"


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


def _load_error(source: str, **kwargs) -> BaseException:
    from weightcast.workers.api import load_pretrained
    with pytest.raises(Exception) as info:
        load_pretrained(source, progress=False, **kwargs)
    return info.value


def _plan_error(source: str, **options) -> BaseException:
    import argparse
    from weightcast.launch.cmd_plan import make_plan, plan_defaults
    args = argparse.Namespace(**{**plan_defaults(), "source": source, "nodes": 1, "cpus_per_node": 2,
                                 "device_map": "replicate", **options})
    with pytest.raises(Exception) as info:
        make_plan(args)
    return info.value


def _plan_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli(["plan", *argv])
    return code, capsys.readouterr().err


def _remote_code_checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "custom"
    cf.save_tiny_llama(d, max_shard_size="10MB")
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="acme-custom-model", architectures=["AcmeForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_acme.py").write_text(f"open({str(tmp_path / 'REMOTE_CODE_RAN')!r}, 'w').close()\n")
    return d


def test_remote_code_is_refused_by_plan_as_by_a_load(tmp_path, capsys):
    d = _remote_code_checkpoint(tmp_path)
    load, plan = _load_error(str(d)), _plan_error(str(d))
    assert type(load) is RemoteCodeRefusedError and type(plan) is RemoteCodeRefusedError, (load, plan)
    assert "auto_map" in str(plan) and "trust_remote_code=True" in str(plan)
    code, err = _plan_cli(capsys, str(d), "--nodes", "1", "--cpus-per-node", "2")
    assert code == 2 and "asks for remote code" in err and "Traceback" not in err
    code, _ = _plan_cli(capsys, str(d), "--nodes", "1", "--cpus-per-node", "2", "--device-map", "replicate",
                        "--trust-remote-code", "--json")
    assert code == 0  # trusted: planned (a replicated map needs no model, so no code runs)
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()


def test_broken_cache_is_refused_by_plan_as_by_a_load(tmp_path, capsys):
    cache = build_hf_cache(str(tmp_path / "hub"))
    make_text_link(cache, NAME)
    load = _load_error(cache.repo_id, cache_dir=cache.cache_dir, local_files_only=True, model=None)
    plan = _plan_error(cache.repo_id, cache_dir=cache.cache_dir, local_files_only=True)
    assert type(load) is CacheError and type(plan) is CacheError, (load, plan)
    assert NAME in str(plan) and "symlink turned into a text file" in str(plan)
    code, err = _plan_cli(capsys, cache.repo_id, "--cache-dir", cache.cache_dir, "--local-files-only",
                          "--nodes", "1", "--cpus-per-node", "2")
    assert code == 2 and NAME in err


def test_a_plan_that_does_not_fit_is_refused_by_plan_as_by_a_load(tmp_path, capsys):
    """A 1 TB sparse file with a valid header: each rank would own 10**12 bytes."""
    header, n = cf.header_for({"w": ("U8", [10**6, 10**6], 10**12)})
    cf.write_raw(tmp_path / NAME, header)
    os.truncate(tmp_path / NAME, (tmp_path / NAME).stat().st_size + n)
    (tmp_path / "cluster.yaml").write_text(
        "name: small\nstorage: shared\nnodes:\n  count: 1\n  ranks_per_node: 1\n  host_memory: 16GB\n")
    load = _load_error(str(tmp_path), model=None)  # this machine has far less than 1 TB
    plan = _plan_error(str(tmp_path), nodes=None, cpus_per_node=None, cluster=str(tmp_path / "cluster.yaml"))
    assert type(load) is DeviceMapError and type(plan) is DeviceMapError, (load, plan)
    for err in (load, plan):
        assert "does not fit its memory" in str(err) and "'w'" in str(err)
    code, err = _plan_cli(capsys, str(tmp_path), "--cluster", str(tmp_path / "cluster.yaml"))
    assert code == 2 and "does not fit its memory" in err


def test_load_order_round_trips_through_one_encoding(tmp_path):
    """plan_codec encodes the whole order once: the plan and device map are JSON objects inside
    it (not strings of JSON), and decoding gives back equal fields and a byte-identical plan."""
    from weightcast.orchestrator.cluster import cluster_from_flags
    from weightcast.orchestrator.plan_codec import decode_order, encode, encode_order
    from weightcast.orchestrator.prepare import prepare
    from weightcast.orchestrator.request import LoadRequest
    from weightcast.workers.prepare_hooks import WorkerHooks
    cf.save_tiny_llama(tmp_path / "m", max_shard_size="10MB")
    cluster = cluster_from_flags(2, 2, cpu=True)
    order = prepare(LoadRequest(str(tmp_path / "m"), device_map="auto"), cluster, WorkerHooks(), load_id="abc")
    blob = encode_order(order)
    doc = json.loads(blob)
    assert isinstance(doc["plan"], dict) and isinstance(doc["device_map"], dict)
    back = decode_order(blob)
    assert encode(back.plan) == encode(order.plan) and back.device_map == order.device_map
    for name in ("kind", "root", "config", "transport", "load_id", "checkpoint_bytes", "init_seed", "auto_dtype"):
        assert getattr(back, name) == getattr(order, name), name
    assert back.transport == "node-shared" and back.load_id == "abc"
