"""Which S3 client reads ranges fastest: boto3 (ranged GETs, one pooled client, threads) vs
obstore (Rust, ``get_ranges``), against a local SeaweedFS, for 8-64 MiB ranges and 1-32
requests in flight. Each configuration reads the whole object once per trial into one
preallocated buffer; min and median of ``--trials`` are printed (GB/s).

    python -m benchmarks.s3_clients [--mib 256] [--trials 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

BUCKET, KEY = "bench", "blob.bin"


def _boto3_client(server, pool: int):
    import boto3
    from botocore.config import Config
    env = server.env()
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                        config=Config(max_pool_connections=max(10, pool)))


def boto3_read(client, size: int, part: int, inflight: int, dest: memoryview) -> None:
    def one(off: int) -> None:
        n = min(part, size - off)
        body = client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={off}-{off + n - 1}")["Body"]
        data = body.read()
        dest[off:off + len(data)] = data
    with ThreadPoolExecutor(inflight) as pool:
        list(pool.map(one, range(0, size, part)))


def obstore_read(store, size: int, part: int, inflight: int, dest: memoryview) -> None:
    import obstore
    starts = list(range(0, size, part))
    for i in range(0, len(starts), inflight):  # get_ranges coalesces and runs a batch concurrently
        batch = starts[i:i + inflight]
        parts = obstore.get_ranges(store, KEY, starts=batch, ends=[min(s + part, size) for s in batch])
        for s, buf in zip(batch, parts):
            mv = memoryview(buf)
            dest[s:s + len(mv)] = mv


def _obstore_store(server):
    from obstore.store import S3Store
    env = server.env()
    return S3Store(BUCKET, endpoint=env["AWS_ENDPOINT_URL"], access_key_id=env["AWS_ACCESS_KEY_ID"],
                   secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                   client_options={"allow_http": True}, virtual_hosted_style_request=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--parts", default="8,16,32,64")
    ap.add_argument("--inflight", default="1,4,8,16,32")
    args = ap.parse_args(argv)
    from s3_server import start_seaweedfs
    size = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        server = start_seaweedfs(tmp)
        try:
            client = _boto3_client(server, 32)
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key=KEY, Body=os.urandom(size))
            store = _obstore_store(server)
            dest = memoryview(bytearray(size))
            print(f"object {args.mib} MiB, trials {args.trials}; GB/s min / median of trials (higher is better)")
            print(f"{'client':8} {'part MiB':>8} {'inflight':>8} {'min':>6} {'median':>6} {'max':>6}")
            for part in [int(p) << 20 for p in args.parts.split(",")]:
                for inflight in [int(i) for i in args.inflight.split(",")]:
                    for name, fn, handle in (("boto3", boto3_read, client), ("obstore", obstore_read, store)):
                        rates = []
                        for _ in range(args.trials):
                            t = time.perf_counter()
                            fn(handle, size, part, inflight, dest)
                            rates.append(size / (time.perf_counter() - t) / 1e9)
                        print(f"{name:8} {part >> 20:8} {inflight:8} {min(rates):6.2f} "
                              f"{statistics.median(rates):6.2f} {max(rates):6.2f}", flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
