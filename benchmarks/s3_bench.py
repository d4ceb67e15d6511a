"""Loading from S3 on one machine, one server: weightcast replicate (node-shared, each byte
fetched once) on N = 1, 2, 4 ranks vs Run:ai's streamer (its S3 backend, every rank streams the
whole checkpoint) vs every rank downloading the objects (boto3 ``download_file``) and calling
``from_pretrained``. The server is a local SeaweedFS behind the counting proxy of the tests
(tests/s3_proxy.py), so "served" is every body byte the ranks received.

Per trial: wall time from a common start (a file barrier after imports) to the last rank done,
bytes served, and summed PSS of the ranks after each touched every page it holds.
weightcast and Run:ai return state dicts (``model=None``); the download row builds the model.

    python -m benchmarks.s3_bench [--ckpt minilm|llama-640m] [--trials 3] [--ranks 1,2,4] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
BUCKET = "bench"
LOADERS = ("weightcast", "runai", "download")


def _barrier(directory: str, world: int, rank: int, timeout: float = 120.0) -> None:
    Path(directory, f"ready-{rank}").touch()
    deadline = time.monotonic() + timeout
    while len(glob.glob(os.path.join(directory, "ready-*"))) < world:
        if time.monotonic() > deadline:
            raise TimeoutError("ranks did not all start")
        time.sleep(0.005)


def _load(loader: str, url: str, scratch: str):
    if loader == "weightcast":
        from weightcast.workers.api import load_pretrained
        return load_pretrained(url, model=None, device_map="replicate", progress=False, timeout=600,
                               storage_options={"request_bytes": 8 << 20, "concurrency": 4})
    if loader == "runai":
        from runai_model_streamer import SafetensorsStreamer
        import boto3
        prefix = url.split("/", 3)[3]
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]
                if o["Key"].endswith(".safetensors")]
        state = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_files([f"s3://{BUCKET}/{k}" for k in keys], device="cpu", is_distributed=False)
            for name, tensor in streamer.get_tensors():
                state[name] = tensor
        return state
    import boto3
    from transformers import AutoModel
    prefix = url.split("/", 3)[3]
    client = boto3.client("s3")
    local = tempfile.mkdtemp(dir=scratch)
    for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]:
        client.download_file(BUCKET, o["Key"], os.path.join(local, o["Key"].rsplit("/", 1)[1]))
    return AutoModel.from_pretrained(local)


def rank_job(args: dict) -> dict:
    """One rank of one trial (run by weightcast.launch.local.spawn)."""
    import torch  # noqa: F401 - imported before the barrier, as every loader needs it
    from benchmarks.procfs import memory, touch_all
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args["loader"] == "weightcast":
        import weightcast.workers.api  # noqa: F401
    _barrier(args["barrier"], world, rank)
    start = time.time()
    result = _load(args["loader"], args["url"], args["scratch"])
    touched = touch_all(result)
    end = time.time()
    return {"rank": rank, "start": start, "end": end, "touched": touched, "pss": memory()["pss"]}


def _trial(loader: str, n: int, url: str, proxy, scratch: str) -> dict:
    from weightcast.launch.local import spawn
    barrier = tempfile.mkdtemp(dir=scratch)
    proxy.clear()
    env = {"RUNAI_STREAMER_DIST": "0"}
    os.environ.update(env)
    try:
        results = spawn(n, "benchmarks.s3_bench:rank_job",
                        {"loader": loader, "url": url, "barrier": barrier, "scratch": scratch}, timeout=900)
    except Exception as exc:  # noqa: BLE001 - a loader failing is a result too
        return {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[-1][:300]}", "served": proxy.get_bytes()}
    finally:
        shutil.rmtree(barrier, ignore_errors=True)
        for d in glob.glob(os.path.join(scratch, "tmp*")):
            shutil.rmtree(d, ignore_errors=True)
    values = [r.value for r in results]
    return {"seconds": max(v["end"] for v in values) - min(v["start"] for v in values),
            "served": proxy.get_bytes(), "pss": sum(v["pss"] for v in values)}


def _row(loader: str, n: int, trials: list[dict], size: int) -> dict:
    ok = [t for t in trials if "failed" not in t]
    failed = [t["failed"] for t in trials if "failed" in t]
    row = {"loader": loader, "ranks": n, "trials": trials, "failed": len(failed)}
    if ok:
        secs = [t["seconds"] for t in ok]
        row.update(min_s=min(secs), median_s=statistics.median(secs), served_x=ok[-1]["served"] / size,
                   pss_gb=ok[-1]["pss"] / 1e9)
        print(f"N={n} {loader:10} min {row['min_s']:.2f} s, median {row['median_s']:.2f} s, served "
              f"{row['served_x']:.2f} x, summed PSS {row['pss_gb']:.2f} GB ({len(ok)}/{len(trials)} trials ok)",
              flush=True)
    for reason in failed:
        print(f"N={n} {loader:10} FAILED: {reason}", flush=True)
    return row


def _make_checkpoint(name: str, root: str) -> str:
    path = os.path.join(root, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    if name == "minilm":
        from benchmarks.checkpoints import ensure
        return ensure("minilm", root)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="200MB")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="llama-640m", choices=["minilm", "llama-640m"])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import boto3
    from s3_proxy import CountingProxy
    from s3_server import start_seaweedfs
    ckpt = _make_checkpoint(args.ckpt, os.path.abspath(args.data))
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(ckpt, "*.safetensors")))
    rows = []
    with tempfile.TemporaryDirectory(dir=os.path.abspath(args.data)) as tmp:
        server = start_seaweedfs(tmp)
        proxy = CountingProxy(server.endpoint)
        try:
            os.environ.update(server.env())
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            for f in sorted(os.listdir(ckpt)):
                client.upload_file(os.path.join(ckpt, f), BUCKET, f"{args.ckpt}/{f}")
            os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
            os.environ.setdefault("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")
            url = f"s3://{BUCKET}/{args.ckpt}"
            print(f"checkpoint {args.ckpt}: {size / 1e6:.1f} MB of .safetensors; trials {args.trials}; "
                  f"time from a common start to the last rank done (pages touched)", flush=True)
            for n in [int(x) for x in args.ranks.split(",")]:
                for loader in args.loaders.split(","):
                    rows.append(_row(loader, n, [_trial(loader, n, url, proxy, tmp) for _ in range(args.trials)], size))
        finally:
            proxy.stop()
            server.stop()
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.ckpt, "bytes": size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
