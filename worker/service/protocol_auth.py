"""Authentication of the merge protocol's internal records (`merge_in`, `merge_done`).

The protocol records travel on the public commands topic, because their offsets are the
clocks of the merged items and order them against user writes on the destination's
partition (a separate topic would make replay depend on the interleaving of two logs).
Anyone who may produce commands may therefore produce a record that looks like a
protocol step. So every protocol record a worker produces carries an HMAC-SHA256, in the
header `lhv_internal_mac` (hex), over

    "LHV-INTERNAL-1" | topic | record key | record value     (each length-prefixed)

with a key the workers share; a record without a valid MAC is rejected
(`invalid_request`, dead-letter queue) before it is looked at, and changes nothing. The
MAC covers the exact bytes of the value (no canonical re-encoding to get wrong), and the
topic, so a record cannot be moved to another deployment's topic.

The key: `LHV_INTERNAL_KEY` when set (comma-separated for a rotation: the first signs,
every one verifies, so records already in the log stay valid for replay), else a random
32-byte key kept at `keys/internal-mac.key` in the workers' own bucket and prefix. The
first worker creates it with a create-only conditional put (`If-None-Match: *`) and every
worker reads back what won, so all of them agree with no configuration: the trust root is
the bucket the workers already share for their checkpoints (whoever can write there can
rewrite the checkpoints anyway). `lhv replay --verify` reads the same key (never creates
it: with no key, no worker ever signed a record). The key object is never readable by
`import` (its prefix is refused, `worker/service/importsource.py`).

A MAC says a worker produced the record; it does not make the record's counts or flags
the truth. `worker/service/merge.py` takes those from objects the owners wrote themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import struct
from collections.abc import Sequence

from lhv_index.errors import InvalidRequest
from worker.storage.blobstore import BlobNotFound, BlobStore, PreconditionFailed, get_verified
from worker.wire.headers import PROTOCOL_MAC

__all__ = ["KEY_OBJECT", "MAC_HEADER", "ProtocolAuth", "load_protocol_auth"]

log = logging.getLogger(__name__)

#: header holding the hex HMAC-SHA256 of an internal record
MAC_HEADER = PROTOCOL_MAC
#: key (under the workers' prefix) of the shared random key
KEY_OBJECT = "keys/internal-mac.key"
#: bytes of a generated key, and the least a key may have
KEY_BYTES = 32
MIN_KEY_BYTES = 16
_DOMAIN = b"LHV-INTERNAL-1"
_LEN = struct.Struct(">Q")


def _mac_input(topic: str, key: bytes, value: bytes) -> bytes:
    parts = (_DOMAIN, topic.encode("utf-8"), key, value)
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


class ProtocolAuth:
    """Signs and verifies internal records of one commands topic.

    `keys[0]` signs; every key verifies. With no key nothing verifies (and nothing can be
    signed): a reader that found no key knows no worker ever signed a record.
    """

    __slots__ = ("_keys", "_topic")

    def __init__(self, keys: Sequence[bytes], topic: str) -> None:
        for k in keys:
            if len(k) < MIN_KEY_BYTES:
                raise ValueError(f"an internal key needs at least {MIN_KEY_BYTES} bytes")
        self._keys = tuple(keys)
        self._topic = topic

    def __repr__(self) -> str:
        return f"ProtocolAuth(topic={self._topic!r}, keys={len(self._keys)})"

    def _mac(self, secret: bytes, key: bytes, value: bytes) -> bytes:
        return hmac.new(secret, _mac_input(self._topic, key, value), hashlib.sha256).digest()

    @property
    def can_sign(self) -> bool:
        return bool(self._keys)

    def header(self, key: bytes, value: bytes) -> tuple[str, bytes]:
        """The MAC header to send with the record (`key`, `value`)."""
        if not self._keys:
            raise RuntimeError("no internal key: cannot sign protocol records")
        return MAC_HEADER, self._mac(self._keys[0], key, value).hex().encode("ascii")

    def verify(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        op: str,
        *,
        what: str = "an internal record of the merge protocol",
    ) -> None:
        """Raise `InvalidRequest` unless the record carries one valid MAC header (`what`
        names the kind of record in the message)."""
        macs = [v for k, v in headers if k == MAC_HEADER]
        if len(macs) != 1 or key is None or value is None:
            raise InvalidRequest(
                f"{op} is {what}: only workers produce it (no {MAC_HEADER} header)"
            )
        try:
            given = bytes.fromhex(macs[0].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            given = b""
        if not any(hmac.compare_digest(given, self._mac(k, key, value)) for k in self._keys):
            raise InvalidRequest(
                f"{op} is {what}: its {MAC_HEADER} does not verify, so no worker produced it"
            )


def _configured_keys(configured: str) -> list[bytes]:
    keys = [k.strip().encode("utf-8") for k in configured.split(",") if k.strip()]
    if not keys:
        raise ValueError("LHV_INTERNAL_KEY is set but holds no key")
    for k in keys:
        if len(k) < MIN_KEY_BYTES:
            raise ValueError(f"LHV_INTERNAL_KEY: each key needs at least {MIN_KEY_BYTES} bytes")
    return keys


async def load_protocol_auth(
    blobs: BlobStore, topic: str, configured: str | None, *, create: bool
) -> ProtocolAuth:
    """The `ProtocolAuth` of `topic`: from `configured` (`LHV_INTERNAL_KEY`), else the key
    object in `blobs`, created first when `create` and absent.

    Raises:
        ValueError: `configured` holds no usable key, or the key object is too short.
        BlobStoreError: the store refused the read or write.
    """
    if configured is not None:
        return ProtocolAuth(_configured_keys(configured), topic)
    if create:
        try:
            await blobs.put_if_match(KEY_OBJECT, secrets.token_bytes(KEY_BYTES), None)
            log.info("created the internal protocol key %s", KEY_OBJECT)
        except PreconditionFailed:
            pass  # another worker created it first: use theirs
    try:
        data, _ = await get_verified(blobs, KEY_OBJECT)
    except BlobNotFound:
        if create:
            raise
        log.warning("no internal protocol key at %s: no protocol record will verify", KEY_OBJECT)
        return ProtocolAuth((), topic)
    if len(data) < MIN_KEY_BYTES:
        raise ValueError(f"{KEY_OBJECT} holds {len(data)} bytes, fewer than {MIN_KEY_BYTES}")
    return ProtocolAuth((data,), topic)
