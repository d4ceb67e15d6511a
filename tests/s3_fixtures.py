"""Fixtures shared by the object-storage tests: a real SeaweedFS started once per session (fails
with its reason when it cannot start), a counting / fault-injecting proxy in front of it (both,
and the ``client``, are made session fixtures by tests/conftest.py; ``s3env`` clears the proxy's
faults and counts before each test), the standard AWS variables pointing at the proxy, and a
tiny Llama uploaded as ``s3://models/llama`` (per module)."""
from __future__ import annotations

import re
import time
from pathlib import Path

import boto3
import ckpt_factory as cf
import pytest

from s3_proxy import CountingProxy
from s3_server import start_seaweedfs
from weightcast.orchestrator.checkpoint import load_index
from weightcast.workers.s3 import S3Options, S3Store

BUCKET = "models"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def proxy(server):
    p = CountingProxy(server.endpoint)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def client(server):
    env = server.env()
    c = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    c.create_bucket(Bucket=BUCKET)
    return c


def upload_dir(client, local: Path, prefix: str) -> None:
    """Every regular file of ``local`` as ``prefix/name`` (symlinks and folders have no S3 form)."""
    for entry in sorted(local.iterdir()):
        if entry.is_file() and not entry.is_symlink():
            client.upload_file(str(entry), BUCKET, f"{prefix}/{entry.name}")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, client) -> Path:
    d = tmp_path_factory.mktemp("llama")
    cf.save_tiny_llama(d, tied=False, max_shard_size="100KB")
    upload_dir(client, d, "llama")
    return d


@pytest.fixture
def s3env(server, proxy, monkeypatch):
    """The standard AWS variables, pointing at the proxy (the spawned ranks inherit them)."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    proxy.clear()
    return proxy


def data_bytes_served(proxy: CountingProxy, local: Path, prefix: str) -> int:
    """Body bytes of ranged GETs at or past each object's data start (the weight reads)."""
    index = load_index(local)
    starts = {f"/{BUCKET}/{prefix}/{f.name}": f.data_start for f in index.files}
    total = 0
    for s in proxy.served:
        start = int(re.match(r"bytes=(\d+)-", s.range).group(1)) if s.range else 0
        if s.method == "GET" and s.path in starts and start >= starts[s.path] and s.status == 206:
            total += s.body_bytes
    return total


def store(deadline: float = 60.0) -> S3Store:
    """An S3Store on the models bucket, configured from the environment (s3env)."""
    return S3Store(BUCKET, S3Options(), deadline=time.monotonic() + deadline)
