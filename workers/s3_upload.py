"""Publishing a checkpoint directory to ``s3://bucket/prefix``, in an order that keeps it
whole from a reader's point of view.

Small files (``config.json``, tokenizer files...) go first, then every weight shard (boto3's
managed transfer: multipart uploads of ``part_bytes`` parts, ``concurrency`` in flight; a part
that fails is retried by s3transfer, an upload that fails is aborted, never left half-visible:
an object appears only when its multipart upload completes), and the index
(``*.safetensors.index.json``) last, once every shard it names is complete. A reader resolving
the prefix therefore either finds the previous index or the new one with all its shards; a
single-file checkpoint appears with its last part. Called by one rank (not collective).
"""
from __future__ import annotations

import os
from typing import Any

from weightcast.orchestrator.checkpoint import INDEX_SUFFIX
from weightcast.orchestrator.errors import CheckpointNotFoundError
from weightcast.orchestrator.object_source import parse_object_url
from weightcast.workers.s3 import S3Options, client_for, classify


def upload_order(names: list[str]) -> list[str]:
    """Small files, then weights (``.safetensors``), then indexes: the order that never shows a
    reader an index naming a missing shard."""
    def rank(name: str) -> tuple[int, str]:
        if name.endswith(INDEX_SUFFIX):
            return 2, name
        return (1 if name.endswith(".safetensors") else 0), name
    return sorted(names, key=rank)


def upload_checkpoint(local_dir: str, url: str, storage_options: dict[str, Any] | None = None,
                      *, part_bytes: int = 64 << 20) -> list[str]:
    """Upload every regular file of ``local_dir`` to the prefix ``url`` (see the module doc).
    Returns the keys written, in order. Raises StorageError / CheckpointNotFoundError naming the
    bucket, the key and the fix."""
    from boto3.s3.transfer import TransferConfig
    target = parse_object_url(url)
    options = S3Options.from_dict(storage_options)
    client = client_for(options)
    config = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes,
                            max_concurrency=options.concurrency, use_threads=True)
    names = [n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n))]
    if not names:
        raise CheckpointNotFoundError("Nothing to upload", where=local_dir, fix="save the checkpoint first")
    keys = []
    for name in upload_order(names):
        key = target.child(name)
        try:
            client.upload_file(os.path.join(local_dir, name), target.bucket, key, Config=config)
        except Exception as exc:  # noqa: BLE001 - classified into a clear error
            error = classify(_unwrap(exc), target.bucket, key, options)
            raise getattr(error, "error", error) from exc
        keys.append(key)
    return keys


def _unwrap(exc: BaseException) -> Exception:
    """s3transfer wraps client errors in S3UploadFailedError: classify the cause."""
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, Exception) and type(exc).__name__ == "S3UploadFailedError" else exc  # type: ignore[return-value]
