"""Checkpoints in object storage, against a real S3 server (SeaweedFS on loopback, started here).

The ranks reach the server through a counting, fault-injecting proxy (tests/s3_proxy.py), so
the tests see every body byte served. If the server cannot start, the tests fail with the
reason (they are not skipped).
"""
from __future__ import annotations

import time
from pathlib import Path

import boto3
import ckpt_factory as cf  # sets HF_HUB_OFFLINE
import pytest
import torch
from safetensors.torch import load_file

from s3_fixtures import (BUCKET, data_bytes_served, llama, s3env,  # noqa: F401 - fixtures
                         store, upload_dir)
from tests.ranks import spawn  # forked ranks: see tests/ranks.py
from weightcast.orchestrator.checkpoint import load_index
from weightcast.orchestrator.errors import CheckpointNotFoundError, ConfigError
from weightcast.orchestrator.object_source import load_object_index, parse_object_url, resolve_object_source
from weightcast.workers.s3 import S3Options, S3Store

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------ planning


def test_plan_reads_headers_with_ranged_gets(llama, s3env):
    ckpt = resolve_object_source(store(), parse_object_url(f"s3://{BUCKET}/llama"))
    index = load_object_index(store(), ckpt)
    local = load_index(llama)
    assert [(t.name, t.file, t.dtype, t.shape, t.offset, t.length) for t in index.tensors] == \
        [(t.name, t.file, t.dtype, t.shape, t.offset, t.length) for t in local.tensors]
    assert [(f.name, f.size, f.data_start) for f in index.files] == \
        [(f.name, f.size, f.data_start) for f in local.files]
    etags = {o["Key"]: o["ETag"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="llama/")["Contents"]}
    assert all(f.etag == etags[f"llama/{f.name}"] for f in index.files)
    assert ckpt.source.config["model_type"] == "llama"
    for f in index.files:  # one small first GET per header (these headers fit in it)
        gets = [s for s in s3env.served if s.method == "GET" and s.path.endswith(f.name)]
        assert len(gets) == 1 and gets[0].range == "bytes=0-65535", gets


def test_long_header_takes_a_second_request(tmp_path, client, s3env):
    names = {f"t{i:05d}_{'x' * 60}": torch.zeros(1) for i in range(1500)}  # a ~140 KB header
    cf.write_single(tmp_path, names)
    upload_dir(client, tmp_path, "longheader")
    index = load_object_index(store(), resolve_object_source(store(), parse_object_url(f"s3://{BUCKET}/longheader")))
    assert len(index.tensors) == 1500
    gets = [s.range for s in s3env.served if s.method == "GET" and s.path.endswith("model.safetensors")]
    assert len(gets) == 2 and gets[0] == "bytes=0-65535" and gets[1].startswith("bytes=65536-")


def test_single_object_url_and_missing_things(llama, tmp_path, client, s3env):
    cf.write_single(tmp_path, name="weights.safetensors")
    client.upload_file(str(tmp_path / "weights.safetensors"), BUCKET, "one/weights.safetensors")
    ckpt = resolve_object_source(store(), parse_object_url(f"s3://{BUCKET}/one/weights.safetensors"))
    assert ckpt.source.weight_files == ("weights.safetensors",) and ckpt.index_name is None
    with pytest.raises(CheckpointNotFoundError, match="bucket 'no-such-bucket'.*Fix: check the bucket name"):
        resolve_object_source(S3Store("no-such-bucket", S3Options(), deadline=time.monotonic() + 30),
                              parse_object_url("s3://no-such-bucket/llama"))
    with pytest.raises(CheckpointNotFoundError, match=r"No safetensors weights.*s3://models/nothing-here"):
        resolve_object_source(store(), parse_object_url(f"s3://{BUCKET}/nothing-here"))
    with pytest.raises(CheckpointNotFoundError, match=r"s3://models/one/absent.safetensors"):
        resolve_object_source(store(), parse_object_url(f"s3://{BUCKET}/one/absent.safetensors"))
    with pytest.raises(ConfigError, match="bucket"):
        parse_object_url("s3://A_B/x")
    with pytest.raises(ConfigError, match="Unknown storage_options key"):
        S3Options.from_dict({"endpoint": "x"})


# ------------------------------------------------------------------ loads


def _load_args(local: Path, **kw) -> dict:
    args = {"source": f"s3://{BUCKET}/llama", "verify": True, "verify_root": str(local), "timeout": 90,
            "chunk_bytes": 8192, "storage_options": {"request_bytes": 64 << 10, "concurrency": 4}}
    args.update(kw)
    return args


@pytest.mark.parametrize("strategy,transport", [("replicate", "node-shared"), ("tp", "node-shared"),
                                                ("auto", "node-shared"), ("replicate", "collective")])
def test_load_two_ranks_bit_exact_once(llama, s3env, strategy, transport):
    results = spawn(2, "weightcast.launch.jobs:load_job",
                    _load_args(llama, device_map=strategy, transport=transport), timeout=240)
    assert all(r.value["mismatches"] == [] for r in results)
    assert sum(r.value["verified"] for r in results) >= len(load_index(llama).tensors)
    report = results[0].value["report"]
    checkpoint = load_index(llama).total_bytes
    assert report["checkpoint_bytes"] == checkpoint
    assert report["total_read_bytes"] == checkpoint
    assert data_bytes_served(s3env, llama, "llama") == checkpoint  # 1.00 x (per-rank loading: 2 x)


def test_load_four_ranks_two_tp_replicas(llama, s3env):
    results = spawn(4, "weightcast.launch.jobs:load_job", _load_args(llama, device_map="tp", tp_size=2),
                    timeout=280)
    assert all(r.value["mismatches"] == [] for r in results)
    report = results[0].value["report"]
    assert report["total_read_bytes"] == report["checkpoint_bytes"]
    assert data_bytes_served(s3env, llama, "llama") == report["checkpoint_bytes"]
    assert max(r["owned_bytes"] for r in report["ranks"]) < report["checkpoint_bytes"]


def test_model_auto_equals_from_pretrained(llama, s3env, monkeypatch):
    from transformers import AutoModelForCausalLM
    from weightcast.workers.api import load_pretrained
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    model = load_pretrained(f"s3://{BUCKET}/llama", model="auto", timeout=60,
                            storage_options={"endpoint_url": s3env.endpoint})
    want = AutoModelForCausalLM.from_pretrained(str(llama))
    got_sd, want_sd = model.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys()
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(model(ids).logits, want(ids).logits)


# ------------------------------------------------------------------ command line


def test_cli_inspect_plan_load(llama, s3env, capsys):
    from weightcast.launch.cli import main
    url = f"s3://{BUCKET}/llama"
    assert main(["inspect", url, "--json"]) == 0
    out = capsys.readouterr().out
    assert f'"tensors":{len(load_index(llama).tensors)}' in out.replace(" ", "") or str(len(load_index(llama).tensors)) in out
    assert main(["plan", url, "--nodes", "2", "--cpus-per-node", "2", "--device-map", "tp"]) == 0
    assert "1.000 x checkpoint" in capsys.readouterr().out
    assert main(["load", url, "--nproc", "2", "--verify", "--storage-option", "request_bytes=65536",
                 "--storage-option", "concurrency=2"]) == 0
    out = capsys.readouterr().out
    assert "identical to safetensors" in out
    assert data_bytes_served(s3env, llama, "llama") >= load_index(llama).total_bytes
    assert main(["inspect", f"s3://{BUCKET}/no-such-prefix"]) == 2
    err = capsys.readouterr().err
    assert "No safetensors weights under the S3 prefix" in err and "Traceback" not in err
    assert main(["load", url, "--storage-option", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# ------------------------------------------------------------------ saving


def test_cli_save_to_s3_index_last(llama, s3env, capsys, monkeypatch):
    from weightcast.launch.cli import main
    from weightcast.workers.api import load_pretrained
    assert main(["save", f"s3://{BUCKET}/llama", f"s3://{BUCKET}/llama-resaved", "--nproc", "2",
                 "--max-shard-size", "150KB"]) == 0
    assert f"s3://{BUCKET}/llama-resaved" in capsys.readouterr().out
    writes = [s for s in s3env.served if s.method in ("PUT", "POST") and "llama-resaved" in s.path]
    assert writes[-1].path.endswith("/model.safetensors.index.json"), [w.path for w in writes]
    assert writes[0].path.endswith(".json") and "index" not in writes[0].path  # small files first
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    old = load_pretrained(f"s3://{BUCKET}/llama", model=None, progress=False)
    new = load_pretrained(f"s3://{BUCKET}/llama-resaved", model=None, progress=False)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_upload_uses_multipart_for_large_shards(tmp_path, s3env):
    from weightcast.workers.s3_upload import upload_checkpoint, upload_order
    assert upload_order(["model.safetensors.index.json", "b.safetensors", "config.json", "a.safetensors"]) == \
        ["config.json", "a.safetensors", "b.safetensors", "model.safetensors.index.json"]
    cf.write_single(tmp_path, {"w": torch.randn(3 << 20)})  # 12 MiB
    keys = upload_checkpoint(str(tmp_path), f"s3://{BUCKET}/big", part_bytes=5 << 20)
    assert keys == ["big/model.safetensors"]
    parts = [s for s in s3env.served if s.method == "PUT" and "partNumber=" in s.path]
    assert len(parts) == 3
    done = [s for s in s3env.served if s.method == "POST" and "uploadId=" in s.path]
    assert len(done) == 1 and s3env.served.index(done[0]) > max(s3env.served.index(p) for p in parts)
    sd = load_file(str(tmp_path / "model.safetensors"))
    from weightcast.workers.api import load_pretrained
    got = load_pretrained(f"s3://{BUCKET}/big", model=None, progress=False)
    assert torch.equal(got["w"], sd["w"])


# ------------------------------------------------------------------ error classification (no server)


def _client_error(code: str, status: int, headers: dict | None = None):
    from botocore.exceptions import ClientError
    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}}}, "GetObject")


def test_classify_names_bucket_key_and_fix():
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, NoCredentialsError
    from weightcast.orchestrator.errors import StorageError
    from weightcast.workers.s3 import _Retry, classify
    opts = S3Options()
    region = classify(_client_error("PermanentRedirect", 301, {"x-amz-bucket-region": "eu-west-3"}), "b1", "k", opts)
    assert isinstance(region, StorageError) and "AWS_REGION=eu-west-3" in str(region) and "'b1'" in str(region)
    missing = classify(_client_error("NoSuchBucket", 404), "b1", "k", opts)
    assert isinstance(missing, CheckpointNotFoundError) and "bucket 'b1'" in str(missing)
    key = classify(_client_error("NoSuchKey", 404), "b1", "p/k", opts)
    assert isinstance(key, CheckpointNotFoundError) and "s3://b1/p/k" in str(key)
    denied = classify(_client_error("AccessDenied", 403), "b1", "k", opts)
    assert isinstance(denied, StorageError) and "AWS_ACCESS_KEY_ID" in str(denied)
    changed = classify(_client_error("PreconditionFailed", 412), "b1", "k", opts)
    assert "changed between planning and reading" in str(changed)
    assert isinstance(classify(_client_error("SlowDown", 503), "b1", "k", opts), _Retry)
    assert isinstance(classify(_client_error("InternalError", 500), "b1", "k", opts), _Retry)
    assert isinstance(classify(EndpointConnectionError(endpoint_url="http://x"), "b1", "k", opts), _Retry)
    assert isinstance(classify(ConnectionClosedError(endpoint_url="http://x"), "b1", "k", opts), _Retry)
    creds = classify(NoCredentialsError(), "b1", "k", opts)
    assert isinstance(creds, StorageError) and "AWS_PROFILE" in str(creds)
