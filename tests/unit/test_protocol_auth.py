"""MACs of the merge protocol's internal records."""

from __future__ import annotations

import asyncio

import pytest

from lhv_index.errors import InvalidRequest
from worker.service.protocol_auth import KEY_OBJECT, MAC_HEADER, ProtocolAuth, load_protocol_auth
from worker.storage.blobstore import MemoryBlobStore

KEY, VALUE = b"docs", b'{"op":"merge_done","index":"docs"}'


@pytest.mark.asyncio
async def test_workers_agree_on_one_key_created_once() -> None:
    async with MemoryBlobStore(prefix="p/") as blobs:
        first, second = await asyncio.gather(
            *(load_protocol_auth(blobs, "lhv.commands", None, create=True) for _ in range(2))
        )
        assert len(blobs.objects[f"p/{KEY_OBJECT}"]) == 32
        reader = await load_protocol_auth(blobs, "lhv.commands", None, create=False)
    header = first.header(KEY, VALUE)
    assert header[0] == MAC_HEADER
    second.verify(KEY, VALUE, [header], "merge_done")
    reader.verify(KEY, VALUE, [("other", b"x"), header], "merge_done")


@pytest.mark.asyncio
async def test_a_reader_never_creates_the_key_and_then_verifies_nothing() -> None:
    async with MemoryBlobStore() as blobs:
        reader = await load_protocol_auth(blobs, "lhv.commands", None, create=False)
        assert blobs.objects == {}
    signer = ProtocolAuth([b"k" * 32], "lhv.commands")
    with pytest.raises(InvalidRequest, match="does not verify"):
        reader.verify(KEY, VALUE, [signer.header(KEY, VALUE)], "merge_done")


def test_any_change_to_a_signed_record_fails_verification() -> None:
    auth = ProtocolAuth([b"k" * 32], "lhv.commands")
    header = auth.header(KEY, VALUE)
    with pytest.raises(InvalidRequest, match="no lhv_internal_mac"):
        auth.verify(KEY, VALUE, [], "merge_in")
    with pytest.raises(InvalidRequest, match="no lhv_internal_mac"):
        auth.verify(KEY, VALUE, [header, header], "merge_in")
    for key, value in ((b"other", VALUE), (KEY, VALUE + b" "), (KEY, VALUE.replace(b"x", b"y"))):
        if (key, value) == (KEY, VALUE):
            continue
        with pytest.raises(InvalidRequest, match="does not verify"):
            auth.verify(key, value, [header], "merge_in")
    with pytest.raises(InvalidRequest, match="does not verify"):
        ProtocolAuth([b"k" * 32], "other.commands").verify(KEY, VALUE, [header], "merge_in")
    with pytest.raises(InvalidRequest, match="does not verify"):
        auth.verify(KEY, VALUE, [(MAC_HEADER, b"zz")], "merge_in")


@pytest.mark.asyncio
async def test_a_configured_key_list_signs_with_the_first_and_verifies_with_all() -> None:
    async with MemoryBlobStore() as blobs:
        old = await load_protocol_auth(blobs, "t", "o" * 20, create=True)
        rotated = await load_protocol_auth(blobs, "t", f"{'n' * 20}, {'o' * 20}", create=True)
        assert blobs.objects == {}
    rotated.verify(KEY, VALUE, [old.header(KEY, VALUE)], "merge_in")
    with pytest.raises(InvalidRequest):
        old.verify(KEY, VALUE, [rotated.header(KEY, VALUE)], "merge_in")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        await load_protocol_auth(blobs, "t", "short", create=True)
