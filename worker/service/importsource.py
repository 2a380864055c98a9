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
  read stops there if the body runs longer. A `.npy` header's shape times its item size
  is checked against what was read before any array exists (the array is then a view of
  those bytes); a `.npz` is checked from its zip directory (member count, declared
  sizes, compression ratio) before anything is inflated, and members are inflated with
  a cap.

Errors are `invalid_request` naming the import's field, the bound and its setting, and
never echo what was read (no values, no counts of rows of an object): a row is named by
its number in the import.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
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

__all__ = [
    "INTERNAL_PREFIXES",
    "SourcePolicy",
    "decode_npy",
    "decode_npz",
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


# -- decoding within bounds ---------------------------------------------------------------


def _unreadable(field: str, fmt: str) -> InvalidRequest:
    return InvalidRequest(f"import: {field} is not a readable .{fmt} file")


def decode_npy(
    data: bytes | memoryview, field: str, *, kinds: str, max_bytes: int, setting: str
) -> np.ndarray:
    """The array of a `.npy` file held in `data`, as a read-only view of it.

    The header is checked before any array exists: no pickles or objects, a dtype of one
    of `kinds` (numpy kind letters), and shape times item size within `max_bytes` and
    equal to the bytes that follow the header.

    Raises:
        InvalidRequest: unreadable, another dtype, or over `max_bytes` (named by
            `setting`).
    """
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError("unsupported .npy version")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise _unreadable(field, "npy") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in kinds:
        raise InvalidRequest(f"import: {field} holds an array of an unsupported type")
    count = 1
    for n in shape:
        count *= int(n)
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise InvalidRequest(
            f"import: {field} declares an array larger than {max_bytes} bytes ({setting})"
        )
    start = buf.tell()
    if len(data) - start != nbytes:
        raise _unreadable(field, "npy")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_npz(
    data: bytes, field: str, policy: ImportPolicy, members: Iterable[str]
) -> dict[str, np.ndarray]:
    """The arrays `members` (names without `.npy`) of a `.npz` held in `data`, those it has.

    The zip directory is checked before anything is inflated: at most `max_members`
    members, declared sizes within `max_inflated_bytes` in total, each compressed member
    within `max_compression_ratio`; members are then inflated with a cap (a member
    longer than it declares is cut there and fails its check).

    Raises:
        InvalidRequest: unreadable, or over a bound (named with its setting).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > policy.max_members:
                raise InvalidRequest(
                    f"import: {field} has more than {policy.max_members} members "
                    "(LHV_MAX_IMPORT_MEMBERS)"
                )
            declared = sum(i.file_size for i in infos)
            if declared > policy.max_inflated_bytes:
                raise InvalidRequest(
                    f"import: {field} inflates to more than {policy.max_inflated_bytes} bytes "
                    "(LHV_MAX_IMPORT_INFLATED_BYTES)"
                )
            for info in infos:
                if (
                    info.compress_type != zipfile.ZIP_STORED
                    and info.file_size > policy.max_compression_ratio * max(info.compress_size, 1)
                ):
                    raise InvalidRequest(
                        f"import: {field} has a member compressed more than "
                        f"{policy.max_compression_ratio} to 1 "
                        "(LHV_MAX_IMPORT_COMPRESSION_RATIO)"
                    )
            by_name = {i.filename: i for i in infos}
            out: dict[str, np.ndarray] = {}
            budget = policy.max_inflated_bytes
            for name in members:
                member = by_name.get(name + ".npy")
                if member is None:
                    continue
                with zf.open(member) as f:
                    raw = f.read(min(member.file_size, budget) + 1)
                if len(raw) > member.file_size or len(raw) > budget:
                    raise InvalidRequest(
                        f"import: {field} inflates past its bound (LHV_MAX_IMPORT_INFLATED_BYTES)"
                    )
                budget -= len(raw)
                out[name] = decode_npy(
                    raw,
                    f"{field} member {name!r}",
                    kinds="fiuUS" if name == "ids" else "fiu",
                    max_bytes=policy.max_inflated_bytes,
                    setting="LHV_MAX_IMPORT_INFLATED_BYTES",
                )
            return out
    except InvalidRequest:
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
        ValueError,
        OSError,
        EOFError,
    ) as exc:
        raise _unreadable(field, "npz") from exc


def row_of(data: bytes, position: int) -> int:
    """The row (0-based line number) of byte `position` in a line-oriented object."""
    return data.count(b"\n", 0, position)
