"""Object storage behind one small protocol: S3 (aioboto3) and in memory.

`BlobStore` is the seam between the snapshot store and the network: `S3BlobStore` talks to
any S3 API (AWS, SeaweedFS, MinIO), `MemoryBlobStore` keeps the same semantics in a dict
for unit tests. Keys are relative to the store's prefix; ETags are returned exactly as S3
sends them (quoted hex).

Fencing relies on conditional writes: `put_if_match(key, data, etag)` is a PutObject with
`If-Match: <etag>` (or `If-None-Match: *` when `etag` is None). SeaweedFS 4.48 and AWS S3
enforce both atomically: of many concurrent conditional puts with the same ETag exactly one
wins and the rest get 412 (checked by tests/integration/test_stack.py).

Errors (botocore's are translated here, at this one boundary, and chained `from exc`):

    Internal (lhv_index.errors)
    └── BlobStoreError        retriable no   anything else S3 refused (auth, no bucket)
        ├── BlobNotFound      retriable no   the key does not exist
        ├── PreconditionFailed retriable no  the conditional write lost (412)
        ├── BlobTooLarge      retriable no   `get_bounded`: the object is over its bound
        └── StoreUnavailable  retriable yes  timeouts, 5xx, throttling, connection errors
                                              that survived the retries
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import os
import random
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, BinaryIO, NamedTuple, Protocol, Self, TypeVar, runtime_checkable

from lhv_index.errors import Internal
from worker._environ import _env

__all__ = [
    "MIB",
    "BlobData",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "BlobTooLarge",
    "MemoryBlobStore",
    "PreconditionFailed",
    "S3BlobStore",
    "S3Config",
    "StoreUnavailable",
    "T",
    "get_verified",
    "put_unless_same",
]

log = logging.getLogger(__name__)


T = TypeVar("T")

BlobData = bytes | bytearray | memoryview | BinaryIO
"""What `put` accepts: bytes, or a binary file object read from its current position."""

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------
# errors


class BlobStoreError(Internal):
    """The object store refused a request (credentials, missing bucket, bad request)."""

    retriable = False

    def __init__(self, message: str = "", *, key: str | None = None) -> None:
        super().__init__(message)
        #: the key of the request, relative to the store's prefix
        self.key = key


class BlobNotFound(BlobStoreError):
    """`get`, `head` or an If-Match write named a key that does not exist."""


class PreconditionFailed(BlobStoreError):
    """A conditional write lost: the stored ETag is not the expected one (or the key exists
    when `etag=None` asked for create-only). Someone else wrote the key since it was read."""


class BlobTooLarge(BlobStoreError):
    """`get_bounded`: the object's Content-Length, or its body, is over the bound."""


class StoreUnavailable(BlobStoreError):
    """The store could not be reached or kept failing (timeouts, 5xx, throttling) after the
    configured retries. Retry later."""

    retriable = True


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Config:
    """Where the blobs live and how patiently to talk to the S3 API."""

    bucket: str = "lhv"
    """Bucket name; it must exist (the local stack creates it)."""
    endpoint_url: str | None = None
    """e.g. `http://127.0.0.1:8333` for SeaweedFS; None means AWS."""
    prefix: str = ""
    """Key prefix inside the bucket; every key the store sees is relative to it."""
    region: str = "us-east-1"
    access_key_id: str | None = None
    """None: the AWS credential chain (env, profile, instance role) decides."""
    secret_access_key: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    """Upper bound of one network step (one request, or one chunk of a body)."""
    max_attempts: int = 4
    """Attempts for a transient failure before `StoreUnavailable`."""
    backoff_s: float = 0.2
    """First retry delay; doubles each attempt, with jitter, capped at 5 s."""
    multipart_threshold_bytes: int = 16 * MIB
    """Bodies larger than this are uploaded in parts of `part_size_bytes`."""
    part_size_bytes: int = 8 * MIB
    upload_concurrency: int = 4
    """Parts of one multipart upload in flight at once (each holds `part_size_bytes`)."""
    path_style: bool = True
    """Path-style addressing (`endpoint/bucket/key`): what SeaweedFS and MinIO expect."""

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("S3Config.bucket must not be empty")
        if self.prefix.startswith("/"):
            raise ValueError("S3Config.prefix must not start with '/'")
        if self.timeout_s <= 0:
            raise ValueError("S3Config.timeout_s must be > 0")
        if self.max_attempts < 1:
            raise ValueError("S3Config.max_attempts must be >= 1")
        if self.part_size_bytes < 5 * MIB:
            raise ValueError("S3Config.part_size_bytes must be >= 5 MiB (the S3 minimum)")
        if self.multipart_threshold_bytes < self.part_size_bytes:
            raise ValueError("S3Config.multipart_threshold_bytes must be >= part_size_bytes")
        if self.upload_concurrency < 1:
            raise ValueError("S3Config.upload_concurrency must be >= 1")

    @property
    def key_prefix(self) -> str:
        """The prefix as used in keys: empty, or ending with '/'."""
        if not self.prefix:
            return ""
        return self.prefix if self.prefix.endswith("/") else self.prefix + "/"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> S3Config:
        """Read `LHV_S3_BUCKET`, `LHV_S3_ENDPOINT_URL`, `LHV_S3_PREFIX`, `LHV_S3_TIMEOUT_S`
        and the credentials: `LHV_S3_ACCESS_KEY_ID` / `LHV_S3_SECRET_ACCESS_KEY` /
        `LHV_S3_REGION` first, then `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
        `AWS_REGION` (or `AWS_DEFAULT_REGION`). The LHV names let a shell hold the local
        stack's keys beside the user's own AWS ones; the key pair is taken from one source,
        never mixed. Neither set: the AWS credential chain (profile, instance role) decides.
        Keyword overrides win over the environment."""
        key_id, secret = _env(env, "LHV_S3_ACCESS_KEY_ID"), _env(env, "LHV_S3_SECRET_ACCESS_KEY")
        if key_id is None and secret is None:
            key_id, secret = _env(env, "AWS_ACCESS_KEY_ID"), _env(env, "AWS_SECRET_ACCESS_KEY")
        region = _env(env, "LHV_S3_REGION") or _env(env, "AWS_REGION")
        values: dict[str, Any] = {
            "bucket": _env(env, "LHV_S3_BUCKET", "lhv"),
            "endpoint_url": _env(env, "LHV_S3_ENDPOINT_URL"),
            "prefix": _env(env, "LHV_S3_PREFIX", ""),
            "region": region or _env(env, "AWS_DEFAULT_REGION", "us-east-1"),
            "access_key_id": key_id,
            "secret_access_key": secret,
        }
        timeout = _env(env, "LHV_S3_TIMEOUT_S")
        if timeout is not None:
            values["timeout_s"] = float(timeout)
        values.update(overrides)
        return cls(**values)


# --------------------------------------------------------------------------------------
# protocol


class BlobInfo(NamedTuple):
    """What `head` returns."""

    key: str
    etag: str
    size: int


@runtime_checkable
class BlobStore(Protocol):
    """Async object storage with conditional writes. Keys are relative to the store's prefix.

    Lifecycle: `start()` before use, `stop()` (idempotent) after; `async with` does both.
    Every call is bounded in time; a cancelled call leaves the key either as it was or
    fully written, never half-written.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def get(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and ETag. Raises `BlobNotFound`."""
        ...

    async def head(self, key: str) -> BlobInfo:
        """The object's ETag and size. Raises `BlobNotFound`."""
        ...

    async def get_to_file(self, key: str, out: BinaryIO) -> BlobInfo:
        """Stream the object into `out` (emptied first, left at its end), never holding it
        whole in memory; returns its ETag and the bytes written. A read that fails midway
        is retried from the start. Raises `BlobNotFound`."""
        ...

    async def put(self, key: str, data: BlobData) -> str:
        """Write unconditionally; returns the new ETag. File objects are read from their
        current position to EOF."""
        ...

    async def put_if_match(self, key: str, data: BlobData, etag: str | None) -> str:
        """Write only if the stored ETag is `etag` (None: only if the key is absent).

        Returns the new ETag. Raises `PreconditionFailed` when the condition does not hold
        (including `etag` given and the key absent)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the key; removing an absent key is not an error."""
        ...

    async def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix`, sorted."""
        ...


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"blob key must be a non-empty string, not {key!r}")
    if key.startswith("/") or "\x00" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"blob key {key!r} is not a clean relative path")
    return key


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith('"') or etag.startswith('W/"') else f'"{etag}"'


def _md5(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _etag_of(digest: bytes) -> str:
    """The ETag S3 gives a single PutObject whose body has this MD5 `digest`."""
    return f'"{digest.hex()}"'


def _md5_etag(data: bytes | bytearray | memoryview) -> str:
    return _etag_of(_md5(data))


#: a PutObject body up to this size has its MD5 taken on the event loop (about 1 ms)
_MD5_INLINE_BYTES = 1 << 20


async def get_verified(
    store: BlobStore, key: str, *, attempts: int = 3, backoff_s: float = 0.2
) -> tuple[bytes, str]:
    """`store.get(key)`, checked against the object's ETag where that is the MD5 of its
    bytes (a single PutObject; a multipart ETag cannot be checked) and read again when
    they differ: a body cut short by the server is then a retry, not bad data.

    Raises:
        BlobNotFound: no such key.
        StoreUnavailable: every read's bytes differed from its ETag.
    """
    for attempt in range(1, attempts + 1):
        data, etag = await store.get(key)
        if "-" in etag or _md5_etag(data) == _quote_etag(etag):
            return data, etag
        log.warning(
            "%s: %d bytes read do not match ETag %s (read %d/%d)", key, len(data), etag,
            attempt, attempts,
        )  # fmt: skip
        if attempt < attempts:
            await asyncio.sleep(backoff_s * attempt)
    raise StoreUnavailable(f"{key!r}: the bytes read never matched the ETag", key=key)


async def put_unless_same(store: BlobStore, key: str, data: bytes) -> bool:
    """Write `data` under `key` unless the object there already holds exactly these bytes
    (same MD5 ETag of a single PutObject); returns whether it wrote.

    For a step that may run again and writes the same bytes each time: rewriting an
    object is not harmless while others read it, since a GET concurrent with the
    overwrite can get a short body on some S3 servers (seen with SeaweedFS)."""
    try:
        await store.put_if_match(key, data, None)
        return True
    except PreconditionFailed:
        pass
    with contextlib.suppress(BlobNotFound):
        if (await store.head(key)).etag == _md5_etag(data):
            return False
    await store.put(key, data)
    return True


def _read_all(data: BlobData) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    return data.read()


# --------------------------------------------------------------------------------------
# memory


class MemoryBlobStore:
    """A dict with S3's semantics (ETags, conditional writes, prefix listing) for unit tests.

    `fail_next(exc, count=1)` makes the next `count` calls raise `exc` (after nothing was
    changed), to test how callers handle a failing store without any network.
    """

    def __init__(self, *, prefix: str = "") -> None:
        self._prefix = S3Config(bucket="memory", prefix=prefix).key_prefix
        self._objects: dict[str, tuple[bytes, str]] = {}
        self._failures: list[BaseException] = []
        self._started = False
        self._closed = False

    # lifecycle
    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("MemoryBlobStore is stopped and cannot be restarted")
        self._started = True

    async def stop(self) -> None:
        self._closed = True

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # test helpers
    def fail_next(self, exc: BaseException, count: int = 1) -> None:
        """Make the next `count` operations raise `exc` without touching any object."""
        self._failures.extend([exc] * count)

    @property
    def objects(self) -> dict[str, bytes]:
        """A copy of the stored objects by full key (prefix included)."""
        return {k: v for k, (v, _) in self._objects.items()}

    def _enter(self, key: str | None) -> str:
        if self._closed:
            raise RuntimeError("MemoryBlobStore is stopped")
        if self._failures:
            raise self._failures.pop(0)
        return "" if key is None else self._prefix + _check_key(key)

    # operations
    async def get(self, key: str) -> tuple[bytes, str]:
        full = self._enter(key)
        try:
            data, etag = self._objects[full]
        except KeyError:
            raise BlobNotFound(f"no object {key!r}", key=key) from None
        return data, etag

    async def head(self, key: str) -> BlobInfo:
        full = self._enter(key)
        try:
            data, etag = self._objects[full]
        except KeyError:
            raise BlobNotFound(f"no object {key!r}", key=key) from None
        return BlobInfo(key, etag, len(data))

    async def get_to_file(self, key: str, out: BinaryIO) -> BlobInfo:
        full = self._enter(key)
        try:
            data, etag = self._objects[full]
        except KeyError:
            raise BlobNotFound(f"no object {key!r}", key=key) from None
        out.seek(0)
        out.truncate()
        out.write(data)
        return BlobInfo(key, etag, len(data))

    async def put(self, key: str, data: BlobData) -> str:
        full = self._enter(key)
        body = _read_all(data)
        etag = _md5_etag(body)
        self._objects[full] = (body, etag)
        return etag

    async def put_if_match(self, key: str, data: BlobData, etag: str | None) -> str:
        full = self._enter(key)
        current = self._objects.get(full)
        if etag is None:
            if current is not None:
                raise PreconditionFailed(f"{key!r} already exists", key=key)
        elif current is None or current[1] != _quote_etag(etag):
            raise PreconditionFailed(f"{key!r} does not have ETag {etag}", key=key)
        body = _read_all(data)
        new = _md5_etag(body)
        self._objects[full] = (body, new)
        return new

    async def delete(self, key: str) -> None:
        full = self._enter(key)
        self._objects.pop(full, None)

    async def list(self, prefix: str = "") -> list[str]:
        self._enter(None)
        start = self._prefix + prefix
        n = len(self._prefix)
        return sorted(k[n:] for k in self._objects if k.startswith(start))


# --------------------------------------------------------------------------------------
# S3

#: S3 error codes that a later attempt may not see
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ConditionalRequestConflict",  # 409: a concurrent conditional write; retry decides
        "OperationAborted",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})


class _Transient(Exception):
    """Internal marker: one attempt failed in a way a retry may fix."""


@contextlib.contextmanager
def _s3_errors(op: str, key: str | None) -> Iterator[None]:
    """Translate botocore/aiohttp errors of one attempt into LHV errors (or `_Transient`)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        what = f"{op} {key!r}" if key is not None else op
        if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            raise BlobNotFound(f"{what}: no such key", key=key) from exc
        if code in _PRECONDITION_CODES or status == 412:
            raise PreconditionFailed(f"{what}: precondition failed", key=key) from exc
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            raise _Transient(f"{what}: {code or status} {err.get('Message', '')}") from exc
        raise BlobStoreError(
            f"{what}: {code or status}: {err.get('Message', '')}", key=key
        ) from exc
    except (BotoConnectionError, HTTPClientError, TimeoutError, OSError) as exc:
        raise _Transient(f"{op} {key!r}: {type(exc).__name__}: {exc}") from exc
    except BotoCoreError as exc:
        raise BlobStoreError(f"{op} {key!r}: {exc}", key=key) from exc
    except Exception as exc:
        # aiohttp's errors (ClientError, ServerDisconnectedError) without importing it
        if type(exc).__module__.startswith("aiohttp"):
            raise _Transient(f"{op} {key!r}: {type(exc).__name__}: {exc}") from exc
        raise


class S3BlobStore:
    """`BlobStore` over the S3 API with aioboto3.

    Every network step runs under `asyncio.timeout(config.timeout_s)`; transient failures
    are retried `config.max_attempts` times with exponential backoff and jitter (botocore's
    own retries are off, so the bounds are ours). Bodies larger than
    `multipart_threshold_bytes` are uploaded in parts, `upload_concurrency` at a time (the
    first failed part aborts the upload); conditional writes are single requests (bodies
    up to 5 GiB).

    Note: a conditional write whose first attempt timed out may have landed; if the retry
    then sees 412, the store compares the stored ETag with the MD5 of its own body and
    returns success when they match, so a lost reply never looks like a lost race.
    """

    def __init__(self, config: S3Config) -> None:
        self._config = config
        self._prefix = config.key_prefix
        self._client: Any = None
        self._exit: contextlib.AsyncExitStack | None = None
        self._closed = False

    @property
    def config(self) -> S3Config:
        return self._config

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self._config.bucket!r}, prefix={self._prefix!r})"

    # lifecycle
    async def start(self) -> None:
        """Open the client and check the bucket is reachable.

        Raises:
            BlobStoreError: the bucket does not exist or the credentials are refused.
            StoreUnavailable: the endpoint cannot be reached.
        """
        if self._closed:
            raise RuntimeError("S3BlobStore is stopped and cannot be restarted")
        assert self._client is None, "S3BlobStore.start() called twice"
        import aioboto3
        from botocore.config import Config

        cfg = self._config
        session = aioboto3.Session(
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            region_name=cfg.region,
        )
        boto_config = Config(
            connect_timeout=min(cfg.timeout_s, 10.0),
            read_timeout=cfg.timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path" if cfg.path_style else "auto"},
            # SeaweedFS and MinIO ETags are plain MD5s only without the new default CRCs
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        exit_stack = contextlib.AsyncExitStack()
        try:
            self._client = await exit_stack.enter_async_context(
                session.client("s3", endpoint_url=cfg.endpoint_url, config=boto_config)
            )
            self._exit = exit_stack
            await self._call("head_bucket", None, lambda c: c.head_bucket(Bucket=cfg.bucket))
        except BaseException:
            self._client = None
            self._exit = None
            await exit_stack.aclose()
            raise
        log.info("S3 blob store ready: bucket=%s prefix=%s", cfg.bucket, self._prefix or "-")

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        exit_stack, self._exit, self._client = self._exit, None, None
        if exit_stack is not None:
            await exit_stack.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __del__(self) -> None:
        if self._client is not None and not self._closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)

    # plumbing
    def _full(self, key: str) -> str:
        return self._prefix + _check_key(key)

    def _live_client(self) -> Any:
        if self._client is None:
            raise RuntimeError(
                "S3BlobStore is stopped" if self._closed else "S3BlobStore is not started"
            )
        return self._client

    async def _call(self, op: str, key: str | None, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run one request with a timeout per attempt and retries on transient errors."""
        cfg = self._config
        client = self._live_client()
        delay = cfg.backoff_s
        for attempt in range(1, cfg.max_attempts + 1):
            try:
                with _s3_errors(op, key):
                    async with asyncio.timeout(cfg.timeout_s):
                        return await fn(client)
            except _Transient as exc:
                if attempt == cfg.max_attempts:
                    raise StoreUnavailable(
                        f"{exc} (gave up after {attempt} attempts)", key=key
                    ) from exc.__cause__
                log.warning(
                    "S3 %s failed (attempt %d/%d), retrying: %s", op, attempt, cfg.max_attempts, exc
                )
                await asyncio.sleep(min(delay, 5.0) * (0.5 + random.random()))
                delay *= 2
        raise AssertionError("unreachable")

    async def _read_body(self, body: Any, max_bytes: int | None = None, key: str = "") -> bytes:
        out = io.BytesIO()
        size = 0
        try:
            while True:
                async with asyncio.timeout(self._config.timeout_s):
                    chunk = await body.read(MIB)
                if not chunk:
                    break
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise BlobTooLarge(f"get {key!r}: longer than {max_bytes} bytes", key=key)
                out.write(chunk)
        finally:
            body.close()
        return out.getvalue()

    # operations
    async def get(self, key: str) -> tuple[bytes, str]:
        full = self._full(key)
        bucket = self._config.bucket

        async def op(c: Any) -> tuple[bytes, str]:
            resp = await c.get_object(Bucket=bucket, Key=full)
            return await self._read_body(resp["Body"]), str(resp["ETag"])

        return await self._call("get", key, op)

    async def get_bounded(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes, when at most `max_bytes`: its Content-Length is checked
        before the body is read, and the read stops past `max_bytes` (a body longer than
        its header said). Not part of `BlobStore`: for objects others wrote (imports).

        Raises:
            BlobNotFound: no such key.
            BlobTooLarge: the object is over `max_bytes`.
        """
        full = self._full(key)
        bucket = self._config.bucket

        async def op(c: Any) -> bytes:
            resp = await c.get_object(Bucket=bucket, Key=full)
            declared = int(resp.get("ContentLength") or 0)
            if declared > max_bytes:
                resp["Body"].close()
                raise BlobTooLarge(f"get {key!r}: {declared} bytes, over {max_bytes}", key=key)
            return await self._read_body(resp["Body"], max_bytes, key)

        return await self._call("get", key, op)

    async def get_to_file(self, key: str, out: BinaryIO) -> BlobInfo:
        full = self._full(key)
        cfg = self._config
        delay = cfg.backoff_s
        for attempt in range(1, cfg.max_attempts + 1):
            resp = await self._call("get", key, lambda c: c.get_object(Bucket=cfg.bucket, Key=full))
            try:
                with _s3_errors("get", key):
                    size = await self._copy_body(resp["Body"], out)
                return BlobInfo(key, str(resp["ETag"]), size)
            except _Transient as exc:  # the body broke off: read it again from the start
                if attempt == cfg.max_attempts:
                    raise StoreUnavailable(
                        f"{exc} (gave up after {attempt} attempts)", key=key
                    ) from exc.__cause__
                log.warning(
                    "S3 get of %s broke off (attempt %d/%d), retrying: %s",
                    key, attempt, cfg.max_attempts, exc,
                )  # fmt: skip
                await asyncio.sleep(min(delay, 5.0) * (0.5 + random.random()))
                delay *= 2
        raise AssertionError("unreachable")

    async def _copy_body(self, body: Any, out: BinaryIO) -> int:
        """Copy a response body to `out` in chunks, each read within `timeout_s`."""
        size = 0
        try:
            await asyncio.to_thread(_empty, out)
            while True:
                async with asyncio.timeout(self._config.timeout_s):
                    chunk = await body.read(MIB)
                if not chunk:
                    return size
                size += len(chunk)
                await asyncio.to_thread(out.write, chunk)
        finally:
            body.close()

    async def head(self, key: str) -> BlobInfo:
        full = self._full(key)
        resp = await self._call(
            "head", key, lambda c: c.head_object(Bucket=self._config.bucket, Key=full)
        )
        return BlobInfo(key, str(resp["ETag"]), int(resp["ContentLength"]))

    async def put(self, key: str, data: BlobData) -> str:
        full = self._full(key)
        cfg = self._config
        if isinstance(data, bytes | bytearray | memoryview):
            if len(data) <= cfg.multipart_threshold_bytes:
                return await self._put_object(key, full, bytes(data), {})
            return await self._put_multipart(key, full, _chunks_of_bytes(data, cfg))
        first = await asyncio.to_thread(data.read, cfg.multipart_threshold_bytes + 1)
        if len(first) <= cfg.multipart_threshold_bytes:
            return await self._put_object(key, full, first, {})
        return await self._put_multipart(key, full, _chunks_of_file(first, data, cfg))

    async def put_if_match(self, key: str, data: BlobData, etag: str | None) -> str:
        full = self._full(key)
        body = _read_all(data)
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": _quote_etag(etag)}
        return await self._put_object(key, full, body, cond)

    async def _put_object(self, key: str, full: str, body: bytes, cond: dict[str, str]) -> str:
        """One PutObject, with its body's MD5 as `Content-MD5`: a server then keeps no
        object from a request whose body did not all arrive (SeaweedFS otherwise commits
        an empty object when the writer dies between the request's headers and its body;
        a manifest or marker cut that way would be unreadable)."""
        bucket = self._config.bucket
        attempts = 0
        if len(body) > _MD5_INLINE_BYTES:
            digest = await asyncio.to_thread(_md5, body)
        else:
            digest = _md5(body)
        content_md5 = base64.b64encode(digest).decode("ascii")

        async def op(c: Any) -> str:
            nonlocal attempts
            attempts += 1
            resp = await c.put_object(
                Bucket=bucket, Key=full, Body=body, ContentMD5=content_md5, **cond
            )
            return str(resp["ETag"])

        try:
            return await self._call("put", key, op)
        except PreconditionFailed:
            if attempts > 1:
                # An earlier attempt may have landed before its reply was lost.
                mine = _etag_of(digest)
                with contextlib.suppress(BlobNotFound):
                    if (await self.head(key)).etag == mine:
                        log.info("conditional put of %s had landed on an earlier attempt", key)
                        return mine
            raise

    async def _put_multipart(self, key: str, full: str, parts: AsyncIterator[bytes]) -> str:
        bucket = self._config.bucket
        created = await self._call(
            "create_multipart_upload",
            key,
            lambda c: c.create_multipart_upload(Bucket=bucket, Key=full),
        )
        upload_id = created["UploadId"]
        slots = asyncio.Semaphore(self._config.upload_concurrency)
        uploads: list[asyncio.Task[dict[str, Any]]] = []

        async def upload(number: int, chunk: bytes) -> dict[str, Any]:
            async def op(c: Any) -> Any:
                return await c.upload_part(
                    Bucket=bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk
                )

            try:
                resp = await self._call("upload_part", key, op)
            finally:
                slots.release()
            return {"PartNumber": number, "ETag": resp["ETag"]}

        try:
            number = 0
            async for chunk in parts:  # the next part is read while earlier ones upload
                await slots.acquire()
                for task in uploads:  # stop at the first failed part
                    failed = task.exception() if task.done() else None
                    if failed is not None:
                        raise failed
                number += 1
                uploads.append(asyncio.create_task(upload(number, chunk)))
            done = list(await asyncio.gather(*uploads))
            completed = await self._call(
                "complete_multipart_upload",
                key,
                lambda c: c.complete_multipart_upload(
                    Bucket=bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": done}
                ),
            )
        except BaseException:
            for task in uploads:
                task.cancel()
            await asyncio.gather(*uploads, return_exceptions=True)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._config.timeout_s):
                    await self._live_client().abort_multipart_upload(
                        Bucket=bucket, Key=full, UploadId=upload_id
                    )
            raise
        return str(completed["ETag"])

    async def delete(self, key: str) -> None:
        full = self._full(key)
        await self._call(
            "delete", key, lambda c: c.delete_object(Bucket=self._config.bucket, Key=full)
        )

    async def list(self, prefix: str = "") -> list[str]:
        start = self._prefix + prefix
        n = len(self._prefix)
        bucket = self._config.bucket
        keys: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": start}
            if token:
                kwargs["ContinuationToken"] = token

            async def page(c: Any, kw: dict[str, Any] = kwargs) -> Any:
                return await c.list_objects_v2(**kw)

            resp = await self._call("list", prefix, page)
            keys.extend(obj["Key"][n:] for obj in resp.get("Contents", ()))
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
            if not token:
                break
        return sorted(keys)


def _empty(out: BinaryIO) -> None:
    out.seek(0)
    out.truncate()


async def _chunks_of_bytes(
    data: bytes | bytearray | memoryview, cfg: S3Config
) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(view), cfg.part_size_bytes):
        yield bytes(view[i : i + cfg.part_size_bytes])


async def _chunks_of_file(first: bytes, f: BinaryIO, cfg: S3Config) -> AsyncIterator[bytes]:
    """`first` (read already) and the rest of `f`, in parts of `part_size_bytes` (the last
    may be shorter). Each part is read from the file as one object and passed on as it
    is: a part of an encoded snapshot is copied once on its way to the socket, not
    through a growing buffer on the event loop."""
    size = cfg.part_size_bytes
    whole = len(first) - len(first) % size
    for i in range(0, whole, size):
        yield first[i : i + size]
    part = first[whole:]
    while True:
        more = await asyncio.to_thread(f.read, size - len(part))
        if not more:
            break
        part = part + more if part else more
        if len(part) == size:
            yield part
            part = b""
    if part:
        yield part
