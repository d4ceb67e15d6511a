"""S3 (and S3-compatible) object storage through boto3: :class:`S3Store` (the
:class:`~weightcast.orchestrator.object_source.ObjectStore` planning uses) and :class:`S3Reader`
(a :class:`~weightcast.workers.reader.StorageReader` issuing parallel ranged GETs).

Credentials, endpoint and region come from where boto3 looks itself (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_PROFILE`` and the shared config files, ``AWS_REGION``), overridden by ``storage_options``.
Every ranged GET carries ``If-Match`` with the ETag the plan recorded, and the response's ETag,
range and length are checked too: an object replaced after planning is a StorageError, never a
mix of versions. 500/503/SlowDown, connection resets and short bodies are retried with
exponential backoff and full jitter, within the load's deadline and ``max_attempts``; 403, 404, a
missing bucket and a wrong region are clear errors at once. Readers are per rank, thread-safe,
not collective.
"""
from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, TypeVar

from weightcast.orchestrator.errors import CheckpointNotFoundError, ConfigError, StorageError, WeightcastError
from weightcast.orchestrator.object_source import ObjectInfo, parse_object_url
from weightcast.orchestrator.planner import FileStamp
from weightcast.orchestrator.safetensors_format import check_plain_name

T = TypeVar("T")
_RETRY_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                "ThrottlingException", "RequestTimeTooSkewed", "503", "500", "502", "504"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken",
                 "ExpiredToken", "AllAccessDisabled"}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException",
                 "301", "IncorrectEndpoint"}
_CRED_FIX = ("set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), AWS_PROFILE, or pass "
             "storage_options={'aws_access_key_id': ..., 'aws_secret_access_key': ...}; check the bucket policy")


@dataclass(frozen=True)
class S3Options:
    """``storage_options`` for ``s3://`` sources. Client settings left None are boto3's own
    (environment, profile, config files). ``request_bytes`` / ``concurrency``: the size of one
    ranged GET and how many one rank keeps in flight (defaults measured, see BENCHMARKS.md)."""
    endpoint_url: str | None = None
    region_name: str | None = None
    profile_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    addressing_style: str | None = None  # "path" | "virtual" | "auto"
    request_bytes: int = 8 << 20
    concurrency: int = 4
    max_attempts: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "S3Options":
        """Validate a ``storage_options`` dict (unknown keys and bad sizes are ConfigErrors)."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError("Unknown storage_options key", where="storage_options", got=unknown,
                              expected=f"keys among {sorted(known)}", fix="remove or rename the key")
        out = cls(**options)
        if out.request_bytes < (64 << 10) or out.concurrency < 1 or out.max_attempts < 1:
            raise ConfigError("storage_options out of range", where="storage_options",
                              expected="request_bytes >= 64 KiB, concurrency >= 1, max_attempts >= 1",
                              got=f"request_bytes={out.request_bytes}, concurrency={out.concurrency}, "
                                  f"max_attempts={out.max_attempts}")
        return out


def make_client(options: S3Options, pool: int):
    """A boto3 S3 client with a connection pool of ``pool`` and botocore's own retries off
    (:class:`S3Store` retries within the load's deadline)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise ConfigError("Loading from s3:// needs boto3", got=str(exc),
                          fix="pip install 'weightcast[s3]' (or pip install boto3)") from None
    try:
        session = boto3.Session(profile_name=options.profile_name)
    except Exception as exc:  # noqa: BLE001 - botocore's ProfileNotFound and friends
        raise ConfigError("Cannot use the AWS profile", where=f"profile {options.profile_name!r}",
                          got=f"{type(exc).__name__}: {exc}", fix="check AWS_PROFILE / profile_name and "
                          "~/.aws/config") from None
    s3 = {"addressing_style": options.addressing_style} if options.addressing_style else {}
    config = Config(max_pool_connections=max(10, pool), retries={"total_max_attempts": 1},
                    connect_timeout=options.connect_timeout, read_timeout=options.read_timeout, s3=s3)
    return session.client("s3", endpoint_url=options.endpoint_url, region_name=options.region_name,
                          aws_access_key_id=options.aws_access_key_id,
                          aws_secret_access_key=options.aws_secret_access_key,
                          aws_session_token=options.aws_session_token, config=config)


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()
_BOTO_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION")


def client_for(options: S3Options) -> Any:
    """One boto3 client per process, options and the AWS variables boto3 reads when it builds one
    (creating one costs ~0.3-0.9 s here: imports, service model), pooled for
    ``2 * concurrency + 4`` connections; thread-safe. A later load in the same process with another
    endpoint or other credentials in the environment gets its own client, never a stale one."""
    key = (options, tuple(os.environ.get(name) for name in _BOTO_ENV))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = make_client(options, 2 * options.concurrency + 4)
        return client


def prewarm(storage_options: dict[str, Any] | None) -> None:
    """Every rank, at the start of an ``s3://`` load: build the client in the background while
    rank 0 plans (errors are left for the real use to report)."""
    def run() -> None:
        try:
            client_for(S3Options.from_dict(storage_options))
        except Exception:  # noqa: BLE001 - reported when the client is really needed
            pass
    threading.Thread(target=run, name="weightcast-s3-prewarm", daemon=True).start()


class _Retry(Exception):
    """A failure worth retrying; ``error`` is what to raise when the retries run out."""

    def __init__(self, error: WeightcastError) -> None:
        super().__init__(str(error))
        self.error = error


class S3Store:
    """One bucket through one boto3 client (thread-safe). ``deadline`` (``time.monotonic()``)
    bounds every retry loop; a request that fails past it raises its last error."""

    def __init__(self, bucket: str, options: S3Options, *, deadline: float, client: Any = None) -> None:
        self.bucket = bucket
        self.options = options
        self.deadline = deadline
        self.client = client if client is not None else client_for(options)
        self.retries = 0  # requests retried (for reports and tests)
        self._lock = threading.Lock()

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects directly under ``prefix`` (every page of ListObjectsV2, ``/`` delimited)."""
        def run() -> list[ObjectInfo]:
            out, token = [], None
            while True:
                args = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
                if token:
                    args["ContinuationToken"] = token
                page = self.client.list_objects_v2(**args)
                out += [ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag", "")) for o in page.get("Contents", [])
                        if o["Key"] != prefix]
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    return out
        return self._retrying(run, prefix or "/")

    def head(self, key: str) -> ObjectInfo:
        def run() -> ObjectInfo:
            meta = self.client.head_object(Bucket=self.bucket, Key=key)
            return ObjectInfo(key, int(meta["ContentLength"]), meta.get("ETag", ""))
        return self._retrying(run, key)

    def read(self, key: str, offset: int, length: int, etag: str | None) -> bytes:
        buf = bytearray(length)
        self.read_into(key, offset, memoryview(buf), etag)
        return bytes(buf)

    def read_into(self, key: str, offset: int, dest: memoryview, etag: str | None) -> None:
        """Fill ``dest`` with the bytes at ``offset`` of ``key`` (one ranged GET, retried)."""
        if len(dest):
            self._retrying(lambda: self._get_once(key, offset, dest, etag), key)

    def _get_once(self, key: str, offset: int, dest: memoryview, etag: str | None) -> None:
        n = len(dest)
        args = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={offset}-{offset + n - 1}"}
        if etag:
            args["IfMatch"] = etag
        resp = self.client.get_object(**args)
        if etag and resp.get("ETag") and resp["ETag"] != etag:
            raise _changed(self.url(key), etag, resp["ETag"])
        data = resp["Body"].read()  # botocore checks Content-Length (IncompleteReadError)
        if len(data) != n or not _range_ok(resp.get("ContentRange"), offset, n):
            raise _Retry(StorageError("Short or misplaced body from the object store", where=f"{self.url(key)} "
                                      f"bytes {offset}-{offset + n - 1}", expected=f"{n} bytes at {offset}",
                                      got=f"{len(data)} bytes, Content-Range {resp.get('ContentRange')!r}",
                                      fix="check the object store or a proxy in between; retry the load"))
        dest[:] = data

    def _retrying(self, fn: Callable[[], T], key: str) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except WeightcastError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                retry = exc if isinstance(exc, _Retry) else classify(exc, self.bucket, key, self.options)
                if not isinstance(retry, _Retry):
                    raise retry from exc
                attempt += 1
                pause = random.uniform(0, min(5.0, 0.05 * 2 ** attempt))
                if attempt >= self.options.max_attempts or time.monotonic() + pause > self.deadline:
                    raise _gave_up(retry.error, attempt) from exc
                with self._lock:
                    self.retries += 1
                time.sleep(pause)


def _range_ok(content_range: str | None, offset: int, n: int) -> bool:
    if not content_range:
        return True  # some stores omit it; the length was checked
    return content_range.startswith(f"bytes {offset}-{offset + n - 1}/")


def _changed(where: str, expected: str, got: str) -> StorageError:
    return StorageError("An object changed between planning and reading", where=where,
                        expected=f"ETag {expected}", got=f"ETag {got}" if got else "a different object (412)",
                        fix="do not overwrite a checkpoint while it is loaded; run the load again")


def _gave_up(error: WeightcastError, attempts: int) -> WeightcastError:
    return type(error)(f"{str(error).split('. ')[0]} (after {attempts} attempts)",
                       where=error.where, got=str(error)[:300],
                       fix="the object store keeps failing: check its health; raise timeout= or "
                           "storage_options['max_attempts']")


def classify(exc: Exception, bucket: str, key: str, options: S3Options) -> Exception:
    """A botocore / urllib3 exception -> a WeightcastError to raise, or :class:`_Retry`."""
    from botocore import exceptions as bx
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, bx.ClientError):
        return _client_error(exc, bucket, where, options)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return StorageError("No usable AWS credentials", where=where, got=str(exc), fix=_CRED_FIX)
    if isinstance(exc, bx.EndpointConnectionError):
        return _Retry(StorageError("Cannot connect to the object store", where=where, got=str(exc)[:200],
                                   fix="check AWS_ENDPOINT_URL / storage_options['endpoint_url'] and the network"))
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError, ConnectionError,
                        TimeoutError)) or _is_urllib3(exc):  # HTTPClientError: closed, read timeout, streaming
        return _Retry(StorageError("The connection to the object store failed during a request", where=where,
                                   got=f"{type(exc).__name__}: {str(exc)[:200]}",
                                   fix="check the object store and the network; retry the load"))
    return StorageError("Object storage request failed", where=where, got=f"{type(exc).__name__}: {exc}"[:300],
                        fix="check the endpoint, the bucket and the credentials")


def _is_urllib3(exc: Exception) -> bool:
    return type(exc).__module__.startswith("urllib3")


def _client_error(exc: Exception, bucket: str, where: str, options: S3Options) -> Exception:
    err = exc.response.get("Error", {})  # type: ignore[attr-defined]
    meta = exc.response.get("ResponseMetadata", {})  # type: ignore[attr-defined]
    code, status = str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)
    got = f"HTTP {status} {code}: {err.get('Message', '')}".strip()[:300]
    if code in _RETRY_CODES or status >= 500:
        return _Retry(StorageError("The object store answered with an error", where=where, got=got,
                                   fix="the store is overloaded or failing; retry later"))
    if code == "NoSuchBucket":
        return CheckpointNotFoundError("The S3 bucket does not exist", where=f"bucket {bucket!r} ({where})", got=got,
                                       fix="check the bucket name, AWS_ENDPOINT_URL / endpoint_url and the region")
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return CheckpointNotFoundError("The S3 object does not exist", where=where, got=got,
                                       fix="check the key / prefix (s3://bucket/prefix) and that the upload finished")
    if code == "PreconditionFailed" or status == 412:
        return _changed(where, "recorded when planning", "")
    if code in _DENIED_CODES or status == 403:
        return StorageError("Access to the S3 object was denied", where=where, got=got, fix=_CRED_FIX)
    if code in _REGION_CODES or status == 301:
        region = meta.get("HTTPHeaders", {}).get("x-amz-bucket-region") or err.get("Region")
        return StorageError("The bucket is in another region", where=f"bucket {bucket!r}", got=got,
                            expected=f"region {region}" if region else None,
                            fix=f"set AWS_REGION={region or '<the bucket region>'} or storage_options['region_name']")
    return StorageError("Object storage request failed", where=where, got=got,
                        fix="check the endpoint, the bucket and the credentials")


class S3Reader:
    """A :class:`~weightcast.workers.reader.StorageReader` over the objects of one prefix.

    ``read_into`` cuts a range into ``request_bytes`` GETs run ``concurrency`` at a time; each
    checks the plan's ETag and size. ``staged`` tells the node-shared transport that the bytes
    must land in the node's shared-memory areas (there is no file to map)."""

    staged = True

    def __init__(self, root: str, stamps: Iterable[FileStamp], options: S3Options, *, deadline: float,
                 store: S3Store | None = None) -> None:
        self.prefix = parse_object_url(root)
        self.options = options
        self.request_bytes, self.concurrency = options.request_bytes, options.concurrency
        self.store = store or S3Store(self.prefix.bucket, options, deadline=deadline)
        self.stamps = {s.name: s for s in stamps}
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _key(self, file: str, offset: int, n: int) -> tuple[str, str | None]:
        check_plain_name(file, f"object prefix {self.prefix}")
        stamp = self.stamps.get(file)
        if stamp is not None and offset + n > stamp.size:
            raise StorageError("A read runs past the end of the object", where=f"{self.prefix}/{file}",
                               expected=f"at most {stamp.size} bytes", got=f"bytes {offset}-{offset + n}")
        return self.prefix.child(file), (stamp.etag if stamp is not None else None)

    def read_into(self, file: str, offset: int, dest: memoryview) -> None:
        view = memoryview(dest).cast("B")
        key, etag = self._key(file, offset, len(view))
        step = self.request_bytes
        if len(view) <= step:
            self.store.read_into(key, offset, view, etag)
        else:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="weightcast-s3")
            futures = [self._pool.submit(self.store.read_into, key, offset + a, view[a:a + step], etag)
                       for a in range(0, len(view), step)]
            for f in futures:
                f.result()
        with self._lock:
            self.bytes_read += len(view)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def open_checkpoint(source: str, storage_options: dict[str, Any] | None, timeout: float):
    """Rank 0: resolve an ``s3://`` source -> (store, :class:`ObjectCheckpoint`). Not collective."""
    from weightcast.orchestrator.object_source import resolve_object_source
    url = parse_object_url(source)
    options = S3Options.from_dict(storage_options)
    store = S3Store(url.bucket, options, deadline=time.monotonic() + timeout)
    return store, resolve_object_source(store, url)


def reader_for(root: str, stamps: Iterable[FileStamp], storage_options: dict[str, Any] | None,
               timeout: float) -> S3Reader:
    """Every rank: the reader of an ``s3://`` plan root, its retries bounded by ``timeout``."""
    return S3Reader(root, stamps, S3Options.from_dict(storage_options), deadline=time.monotonic() + timeout)


def resolve_and_index(source: str, *, storage_options: dict[str, Any] | None = None, timeout: float = 300.0,
                      **resolve: Any):
    """Any source -> (ResolvedSource, CheckpointIndex): ``s3://`` through boto3, anything else
    through ``resolve_source`` + ``load_index`` (``resolve``: its keyword arguments). For the
    CLI's ``inspect`` and ``plan``; not collective."""
    from weightcast.orchestrator.object_source import is_object_url, load_object_index
    if is_object_url(source):
        store, ckpt = open_checkpoint(source, storage_options, timeout)
        return ckpt.source, load_object_index(store, ckpt)
    from weightcast.orchestrator.checkpoint import load_index
    from weightcast.orchestrator.source import resolve_source
    src = resolve_source(source, **resolve)
    return src, load_index(src.root, cache_root=src.cache_root)
