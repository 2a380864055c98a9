"""Where `import` may read from, and reading its objects within bounds.

An import makes the worker read S3 objects with its own credentials, which reach more
than the requester should see (its own snapshots and manifests, other buckets). So:

- A source URI must be a plain `s3://bucket/key`: a valid bucket name, a key without
  empty, `.` or `..` segments, percent signs, backslashes, `?`, `#` or control
  characters (no path tricks, no other scheme or endpoint: every read goes to the
  worker's own S3 endpoint).
- It must lie under one of the allowed prefixes (`ImportPolicy.sources`,
  `LHV_IMPORT_SOURCES`; default `s3://<bucket>/<prefix>imports/` of the worker's own
  store), and never under the worker's own `partitions/`, `merges/` or `keys/`, whatever
  the allow-list says.
- An object is read only when its Content-Length is within `max_object_bytes`, and the
  read stops there if the body runs longer. `.npy` and `.npz` objects are read by
  `worker.wire.arrays`, the reader of `lhv load` too: a `.npy` header's shape times its
  item size is checked against what was read before any array exists (the array is then
  a view of those bytes); a `.npz` is checked from its zip directory (member count,
  declared sizes, compression ratio) before anything is inflated, and members are
  inflated with a cap.

Errors are `invalid_request` naming the import's field, the bound and its setting, and
never echo what was read (no values, no counts of rows of an object): a row is named by
its number in the import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from lhv_index.errors import InvalidRequest
from worker.service.config import ImportPolicy
from worker.storage.blobstore import (
    BlobNotFound,
    BlobStoreError,
    BlobTooLarge,
    S3BlobStore,
    S3Config,
    StoreUnavailable,
)
from worker.wire.arrays import ArrayFileError, NpzBounds, RowError, read_npy, read_npz

__all__ = [
    "INTERNAL_PREFIXES",
    "SourcePolicy",
    "as_import_error",
    "decode_npy",
    "decode_npz",
    "npz_bounds",
    "parse_s3_uri",
    "read_object",
    "row_of",
]

#: prefixes (under the workers' own prefix) of objects an import may never read:
#: checkpoints, merge exports and markers, the internal protocol key
INTERNAL_PREFIXES = ("partitions/", "merges/", "keys/")

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BAD_KEY_CHARS = re.compile(r"[%\\?#\x00-\x1f\x7f]")
_MAX_KEY_BYTES = 1024


def _clean_key(key: str, *, prefix: bool) -> bool:
    if _BAD_KEY_CHARS.search(key) or len(key.encode("utf-8", "replace")) > _MAX_KEY_BYTES:
        return False
    if prefix:
        if not key:
            return True
        if not key.endswith("/"):
            return False
        key = key[:-1]
    return bool(key) and all(part not in ("", ".", "..") for part in key.split("/"))


def _split(uri: str, *, prefix: bool) -> tuple[str, str] | None:
    if not uri.startswith("s3://"):
        return None
    bucket, sep, key = uri[5:].partition("/")
    if not sep or not _BUCKET.fullmatch(bucket) or ".." in bucket:
        return None
    if not _clean_key(key, prefix=prefix):
        return None
    return bucket, key


def parse_s3_uri(uri: str, field: str = "source") -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key), refusing anything but a plain object URI.

    Raises:
        InvalidRequest: another scheme, a bad bucket name, or a key with empty, `.` or
            `..` segments, percent-encoding, backslashes, `?`, `#` or control characters.
    """
    parts = _split(uri, prefix=False)
    if parts is None:
        raise InvalidRequest(
            f"import: {field} must be a plain s3://bucket/key URI (no '..', '//', "
            "percent-encoding, query or other scheme)"
        )
    return parts


@dataclass(frozen=True, slots=True)
class _Allowed:
    bucket: str
    prefix: str


class SourcePolicy:
    """The allow-list of one worker (or `lhv replay`): which URIs an import may read."""

    def __init__(self, policy: ImportPolicy, s3: S3Config) -> None:
        self.policy = policy
        self.s3 = s3
        """the store's endpoint and credentials (every read uses them)"""
        self._bucket = s3.bucket
        self._own = tuple(s3.key_prefix + p for p in INTERNAL_PREFIXES)
        entries = policy.sources
        if entries is None:
            entries = (f"s3://{s3.bucket}/{s3.key_prefix}imports/",)
        self._allowed = tuple(self._entry(e) for e in entries)

    @staticmethod
    def _entry(entry: str) -> _Allowed:
        if entry.startswith("s3://") and entry.count("/") == 2:
            entry += "/"  # a whole bucket: s3://bucket
        if not entry.endswith("/"):
            entry += "/"
        parts = _split(entry, prefix=True)
        if parts is None:
            raise ValueError(f"LHV_IMPORT_SOURCES: {entry!r} is not an s3://bucket/prefix/ URI")
        return _Allowed(*parts)

    @property
    def allowed(self) -> tuple[str, ...]:
        """The allowed prefixes as URIs."""
        return tuple(f"s3://{a.bucket}/{a.prefix}" for a in self._allowed)

    def check(self, uri: str, field: str) -> tuple[str, str]:
        """(bucket, key) of `uri` when an import may read it.

        Raises:
            InvalidRequest: not a plain S3 URI, outside the allow-list, or one of the
                worker's own objects.
        """
        bucket, key = parse_s3_uri(uri, field)
        if bucket == self._bucket and key.startswith(self._own):
            raise InvalidRequest(
                f"import: {field} names one of the workers' own checkpoint, merge or key "
                "objects, which an import never reads"
            )
        if not any(bucket == a.bucket and key.startswith(a.prefix) for a in self._allowed):
            raise InvalidRequest(
                f"import: {field} {uri} is outside the allowed import sources "
                f"(LHV_IMPORT_SOURCES: {', '.join(self.allowed)})"
            )
        return bucket, key


async def read_object(s3: S3Config, bucket: str, key: str, max_bytes: int) -> bytes | None:
    """The object `key` of `bucket` (worker's endpoint and credentials), at most
    `max_bytes` long; None when it does not exist.

    Raises:
        InvalidRequest: the object is larger than `max_bytes`, or the store refused the
            read (credentials, policy): the import's fault.
        StoreUnavailable: the store did not answer.
    """
    try:
        async with S3BlobStore(replace(s3, bucket=bucket, prefix="")) as blobs:
            return await blobs.get_bounded(key, max_bytes)
    except BlobNotFound:
        return None
    except BlobTooLarge as exc:
        raise InvalidRequest(
            f"import: s3://{bucket}/{key} is larger than {max_bytes} bytes (LHV_MAX_IMPORT_BYTES)"
        ) from exc
    except StoreUnavailable:
        raise
    except BlobStoreError as exc:
        raise InvalidRequest(f"import: s3://{bucket}/{key} cannot be read: {exc.code}") from exc


# -- decoding within bounds (`worker.wire.arrays`, the reader `lhv load` uses too) ---------


def npz_bounds(policy: ImportPolicy) -> NpzBounds:
    """An import's bounds on a `.npz`, named by their settings."""
    return NpzBounds(
        max_members=policy.max_members,
        max_inflated_bytes=policy.max_inflated_bytes,
        max_compression_ratio=policy.max_compression_ratio,
        settings=(
            "LHV_MAX_IMPORT_MEMBERS",
            "LHV_MAX_IMPORT_INFLATED_BYTES",
            "LHV_MAX_IMPORT_COMPRESSION_RATIO",
        ),
    )


def as_import_error(exc: ArrayFileError) -> InvalidRequest:
    """A vector file's error as the import's (`item` = the row, when one is to blame)."""
    return InvalidRequest(f"import: {exc}", item=exc.row if isinstance(exc, RowError) else None)


def decode_npy(
    data: bytes | memoryview, field: str, *, kinds: str, max_bytes: int, setting: str
) -> np.ndarray:
    """The array of a `.npy` file held in `data`, as a read-only view of it, checked
    before any array exists (`worker.wire.arrays.read_npy`).

    Raises:
        InvalidRequest: unreadable, another dtype, or over `max_bytes` (named by
            `setting`).
    """
    try:
        return read_npy(data, field, kinds=kinds, max_bytes=max_bytes, setting=setting)
    except ArrayFileError as exc:
        raise as_import_error(exc) from exc


def decode_npz(
    data: bytes, field: str, policy: ImportPolicy, members: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """The arrays `members` of a `.npz` held in `data` (default: its vectors and `ids`),
    checked from its zip directory before anything is inflated
    (`worker.wire.arrays.read_npz`).

    Raises:
        InvalidRequest: unreadable, or over a bound (named with its setting).
    """
    try:
        return read_npz(data, field, npz_bounds(policy), members)
    except ArrayFileError as exc:
        raise as_import_error(exc) from exc


def row_of(data: bytes, position: int) -> int:
    """The row (0-based line number) of byte `position` in a line-oriented object."""
    return data.count(b"\n", 0, position)
